"""Target vectors z: the residual-stream value at the subject's last token that makes the
model say ``target_new`` (the paper's ``compute_z``), optimised for many requests at once.

Each request gets its own delta, and the summed loss gives each delta exactly the gradient
of its own loss, so a batch optimises every request as if it were alone (Adam works per
element). Two ways to compute the logits give the same numbers:

* ``plain``: the whole model, all layers and the vocabulary head at every position (the
  reference algorithm, one request at a time);
* ``fast``: the layers up to the delta's layer run once and are replayed from a cache; the
  tokens before each prompt's subject token, which the delta cannot reach (attention is
  causal), run once and are kept as keys and values, so each step only computes the layers
  above the delta's layer on the tokens from the subject on; and the vocabulary head runs only
  at the positions the loss reads.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.context import ContextTemplates, flatten
from memit.editing.hparams import Z_PROMPT_FORMS, ZOptimizationParams
from memit.editing.keys import KeyTemplates
from memit.editing.prompts import PromptBatch, target_ids, tokenize_prompts
from memit.editing.target_cache import TargetCache
from memit.models.layout import ModelLayout
from memit.prompt_format import RAW, RAW_NAME, PromptFormat, prompt_format
from memit.requests import EditRequest
from memit.utils import distributed
from memit.utils.compat import cache_from_pairs, cache_pairs, empty_cache, set_attn_implementation
from memit.utils.grad import bf16_autocast, trainable_only
from memit.utils.hooks import first_tensor, rewrite_output, run_and_capture, skip_layers_below
from memit.utils.progress import progress

log = logging.getLogger(__name__)

KL_PROMPT = "{} is a"
EARLY_STOP_LOSS = 5e-2


@dataclass
class TargetVectors:
    """Per request: ``init`` is the output of the reference module at the subject's last token
    of the bare prompt, and ``delta`` the optimised change, so the target is ``init + delta``."""

    init: torch.Tensor
    delta: torch.Tensor
    final_loss: torch.Tensor

    @property
    def target(self) -> torch.Tensor:
        return self.init + self.delta


@dataclass
class _Problem:
    """The prompts of a group of requests, flattened into one batch: each request's rewrite
    sequences (in every prompt form), then one KL prompt per request."""

    batch: PromptBatch
    seq_request: torch.Tensor  # request index of each sequence
    target_seq: torch.Tensor  # for each target token: sequence, position, token id, request
    target_pos: torch.Tensor
    target_tok: torch.Tensor
    target_req: torch.Tensor
    seq_weight: torch.Tensor  # per rewrite sequence: its share of its request's target loss
    seq_target_len: torch.Tensor  # per rewrite sequence: number of target tokens (at least 1)
    kl_seq: torch.Tensor  # per request: the sequence of its KL prompt
    init_seq: torch.Tensor  # per request: the sequence of its bare rewrite prompt, raw


def compute_targets(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    hparams: ZOptimizationParams,
    context_templates: ContextTemplates,
    layer: int,
    init_module: str | None = None,
    batch_size: int = 16,
    fast: bool = True,
    autocast: bool = False,
    cache_dir: str | Path | None = None,
) -> TargetVectors:
    """Optimise a delta added to the output of decoder ``layer`` for every request.

    ``cache_dir``: read each request's result from there when cached, and save each batch's
    results as soon as it is done (`memit.editing.target_cache.TargetCache`). In a
    torch.distributed group the requests are split across the processes and every process
    gets all results.

    ``init_module`` (the layer or a module inside it) names the module whose output defines ``init`` and the norms used by the
    clamp and the weight decay (the layer itself for MEMIT, its MLP for ROME).
    """
    init_module = init_module or layout.layer_name(layer)
    cache = TargetCache(cache_dir, model, hparams, context_templates, layer, init_module, autocast) if cache_dir else None
    distributed.barrier()  # every process sees the same cached files
    rows = [cache.load(r) for r in requests] if cache else [None] * len(requests)
    todo = [i for i, row in enumerate(rows) if row is None]
    if cache and len(todo) < len(requests):
        log.info("Target vectors: %d of %d requests cached in %s", len(requests) - len(todo), len(requests), cache.root)
    # Batches of requests with equally long suffixes waste little on padding (each request's
    # result does not depend on its batch).
    if len(todo) > batch_size:
        todo = [todo[i] for i in _by_suffix_length(tok, [requests[i] for i in todo]).tolist()]
    todo = distributed.shard(todo)  # in a torch.distributed group, each process optimises its share
    chunks = range(0, len(todo), batch_size)
    for start in progress(chunks, desc="target vectors", unit="batches", logger=log, disable=len(chunks) <= 1, leave=False):
        indices = todo[start : start + batch_size]
        chunk = [requests[i] for i in indices]
        started = time.perf_counter()
        part = _optimise(model, layout, _build_problem(tok, chunk, context_templates, hparams.z_prompt_forms), len(chunk), hparams, layer, init_module, fast, autocast)
        seconds_each = (time.perf_counter() - started) / len(chunk)
        for j, i in enumerate(indices):
            rows[i] = (part.init[j], part.delta[j], part.final_loss[j : j + 1])
            if cache:
                cache.save(requests[i], *rows[i], seconds=seconds_each)
    if distributed.is_distributed():
        for share in distributed.all_gather({i: rows[i] for i in todo}):
            for i, row in share.items():
                rows[i] = row
    init, delta, loss = zip(*rows)
    return TargetVectors(torch.stack(init), torch.stack(delta), torch.cat(loss))


def _by_suffix_length(tok: PreTrainedTokenizerBase, requests: list[EditRequest]) -> torch.Tensor:
    """Request indices ordered by the number of tokens from the subject's last token to the
    end of the rewrite prompt and target: the tokens each optimisation step recomputes."""
    texts = [r.prompt + tok.decode(target_ids(tok, r.target_new)[:-1]) for r in requests]
    batch = tokenize_prompts(tok, texts, [r.subject for r in requests])
    return torch.argsort(batch.lengths - batch.subject_positions, stable=True)


# Each of the z_prompt_forms: (asked in the chat template, after the context prefixes).
_FORM_LAYOUT = {"raw": (False, True), "chat": (True, False), "chat_context": (True, True), "question": (True, False)}


@dataclass(frozen=True)
class _Form:
    format: PromptFormat
    weight: float
    with_context: bool
    questions: bool = False  # the request's questions instead of its prompt

    def prompts(self, request: EditRequest, templates: list[str]) -> list[str]:
        """The prompts (one ``{}`` each) this form asks ``request`` in, before formatting."""
        if self.questions:
            return list(request.questions)
        return [t.replace("{}", request.prompt, 1) for t in (templates if self.with_context else ["{}"])]


_RAW_FORM = _Form(RAW, 1.0, True)


def prompt_forms(tok: PreTrainedTokenizerBase, weights: dict[str, float]) -> list[_Form]:
    """The prompt forms a target vector is optimised in, raw first, each with its weight; the
    chat forms are left out (with a warning) for a tokenizer without a chat template."""
    forms = []
    for name in Z_PROMPT_FORMS:
        chat, with_context = _FORM_LAYOUT[name]
        weight = weights.get(name, 0.0)
        if weight <= 0:
            continue
        if chat and not getattr(tok, "chat_template", None):
            _warn_no_chat_template()
            continue
        forms.append(_Form(prompt_format(tok, chat_template=chat), weight, with_context, questions=name == "question"))
    return forms or [_RAW_FORM]


def key_templates(tok: PreTrainedTokenizerBase, context_templates: ContextTemplates, hp: ZOptimizationParams) -> KeyTemplates:
    """Where each request's key is read: after the context templates (the paper), or with
    ``keys_in_prompt_forms`` in every form of ``z_prompt_forms`` but the questions (which are
    not the rewrite prompt), each form's weight shared among its groups of templates."""
    if not hp.keys_in_prompt_forms:
        return KeyTemplates.of(context_templates)
    forms = [form for form in prompt_forms(tok, hp.z_prompt_forms) if not form.questions] or [_RAW_FORM]
    total = sum(form.weight for form in forms)
    groups, weights = [], []
    for form in forms:
        form_groups = context_templates if form.with_context else [["{}"]]
        for group in form_groups:
            groups.append(tuple(form.format.prompt(t) for t in group))
            weights.append(form.weight / total / len(form_groups))
    return KeyTemplates(tuple(groups), tuple(weights))


@functools.cache
def _warn_no_chat_template() -> None:
    log.warning("z_prompt_forms: this tokenizer has no chat template; target vectors use the raw form only")


def _build_problem(
    tok: PreTrainedTokenizerBase,
    requests: list[EditRequest],
    context_templates: ContextTemplates,
    form_weights: dict[str, float] | None = None,
) -> _Problem:
    templates = flatten(context_templates)
    forms = prompt_forms(tok, form_weights or {RAW_NAME: 1.0})
    texts, subjects, seq_request, seq_weight, seq_targets, init_seq = [], [], [], [], [], []
    for r, request in enumerate(requests):
        prompts_by_form = [(form, prompts) for form in forms if (prompts := form.prompts(request, templates))]
        if not prompts_by_form:  # only the question form, and this request has no questions
            prompts_by_form = [(_RAW_FORM, _RAW_FORM.prompts(request, templates))]
        total_weight = sum(form.weight for form, _ in prompts_by_form)
        if prompts_by_form[0][0].format.is_chat:
            # init is read on the bare raw prompt, where MEMIT reads the current values too.
            init_seq.append(len(texts))
            texts.append(request.prompt)
            subjects.append(request.subject)
            seq_request.append(r)
            seq_weight.append(0.0)
            seq_targets.append([])
        for form, prompts in prompts_by_form:
            ids = target_ids(tok, form.format.continuation(request.target_new))
            # The prompt is followed by all target tokens but the last; the loss reads each of them.
            prefix_of_target = tok.decode(ids[:-1])
            if not form.format.is_chat:
                init_seq.append(len(texts))
            for prompt in prompts:
                texts.append(form.format.prompt(prompt) + prefix_of_target)
                subjects.append(request.subject)
                seq_request.append(r)
                seq_weight.append(form.weight / (total_weight * len(prompts)))
                seq_targets.append(ids)
    n_rewrite = len(texts)
    for r, request in enumerate(requests):
        texts.append(KL_PROMPT)
        subjects.append(request.subject)
        seq_request.append(r)
    batch = tokenize_prompts(tok, texts, subjects)
    t_seq, t_pos, t_tok, t_req = [], [], [], []
    for seq, ids in enumerate(seq_targets):
        end = int(batch.lengths[seq])
        for offset, token in enumerate(ids):
            t_seq.append(seq)
            t_pos.append(end - len(ids) + offset)
            t_tok.append(token)
            t_req.append(seq_request[seq])
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return _Problem(
        batch=batch,
        seq_request=as_long(seq_request),
        target_seq=as_long(t_seq),
        target_pos=as_long(t_pos),
        target_tok=as_long(t_tok),
        target_req=as_long(t_req),
        seq_weight=torch.tensor(seq_weight, dtype=torch.float32),
        seq_target_len=torch.tensor([max(1, len(ids)) for ids in seq_targets], dtype=torch.float32),
        kl_seq=torch.arange(n_rewrite, n_rewrite + len(requests)),
        init_seq=as_long(init_seq),
    )


def _optimise(
    model: PreTrainedModel,
    layout: ModelLayout,
    problem: _Problem,
    n_requests: int,
    hparams: ZOptimizationParams,
    layer: int,
    init_module: str,
    fast: bool,
    autocast: bool,
) -> TargetVectors:
    inputs = problem.batch.model_inputs(model.device)
    layer_module = layout.layer(model, layer)
    output_kind: list[bool] = []
    kind_hook = layer_module.register_forward_hook(lambda mod, args, out: output_kind.append(isinstance(out, tuple)))
    try:
        with torch.no_grad(), bf16_autocast(autocast, model.device):
            names = list(dict.fromkeys([layout.layer_name(layer), init_module]))
            _, outputs = run_and_capture(model, inputs, outputs_of=names, stop_after=layout.layer_name(layer))
    finally:
        kind_hook.remove()
    cached_layer_out = outputs[layout.layer_name(layer)].detach()
    # The delta and its bookkeeping live on the edit layer's device (layers may be spread
    # over devices); the loss is computed where the vocabulary head is, then brought here.
    device = cached_layer_out.device
    subject_pos = problem.batch.subject_positions.to(device)
    rows = torch.arange(len(subject_pos), device=device)
    seq_request = problem.seq_request.to(device)
    init = outputs[init_module][problem.init_seq.to(device), subject_pos[problem.init_seq.to(device)]].float()
    init_norm = init.norm(dim=-1)

    delta = torch.zeros_like(init, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    done = torch.zeros(n_requests, dtype=torch.bool, device=device)
    frozen = delta.detach().clone()

    def edited_layer_output(layer_out: torch.Tensor) -> torch.Tensor:
        change = torch.zeros_like(layer_out)
        change = change.index_put((rows, subject_pos), delta[seq_request].to(layer_out.dtype))
        return layer_out + change

    suffix = _prepare_suffix(model, inputs, cached_layer_out, problem, subject_pos, autocast) if fast else None
    active_suffix = None
    init_kl_logprobs = None
    losses = torch.zeros(n_requests, device=device)
    target_seq = problem.target_seq.to(device)
    # Under autocast the weights keep requires_grad: autocast caches its bfloat16 copy of a
    # weight only for leaves that require grad, and recasting every weight at every step cost
    # more than the bfloat16 matmuls saved. autograd.grad below computes no weight gradients.
    with trainable_only(model) if not autocast else contextlib.nullcontext(), bf16_autocast(autocast, model.device), _eager_attention(model, enabled=autocast):
        for step in range(hparams.v_num_grad_steps):
            active = ~done
            seq_active = active[seq_request]
            target_active = seq_active[target_seq]
            if fast:
                # Requests that met the early-stop loss leave the batch: their deltas are final.
                if active_suffix is None or len(active_suffix.input_ids) != int(seq_active.sum()):
                    active_suffix = suffix.select(seq_active)
                target_logp, target_margin, kl_logp = _fast_logprobs(
                    model, layout, layer, output_kind[0], active_suffix, delta[seq_request[seq_active]]
                )
            else:
                with rewrite_output(layout.layer(model, layer), edited_layer_output):
                    target_logp, target_margin, kl_logp = _plain_logprobs(model, inputs, problem, subject_pos)
                on_targets = target_active.to(target_logp.device)
                target_logp, target_margin = target_logp[on_targets], target_margin[on_targets]
                kl_logp = kl_logp[active.to(kl_logp.device)]
            if init_kl_logprobs is None:
                init_kl_logprobs = kl_logp.detach().clone()
            active_losses = _loss_per_request(
                target_logp, kl_logp, init_kl_logprobs[active.to(kl_logp.device)], problem, target_active, active, delta, init_norm, hparams
            )
            losses[active] = active_losses.detach()
            done |= losses < EARLY_STOP_LOSS
            if hparams.z_early_stop == "most_probable":
                done |= active & _target_most_probable(target_margin, problem.target_req.to(device)[target_active], n_requests, hparams.z_stop_margin)
            frozen[done] = delta.detach()[done]
            log.debug("step %d loss %s", step, losses.cpu().numpy().round(3))
            if bool(done.all()) or step == hparams.v_num_grad_steps - 1:
                break
            (delta.grad,) = torch.autograd.grad(active_losses[~done[active]].sum(), [delta])
            optimizer.step()
            with torch.no_grad():
                max_norm = hparams.clamp_norm_factor * init_norm
                norms = delta.norm(dim=-1)
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                delta.mul_(scale.unsqueeze(-1))
                # Requests that met the early-stop loss keep the delta they had then.
                delta[done] = frozen[done]
    return TargetVectors(init.detach().cpu(), delta.detach().float().cpu(), losses.detach().float().cpu())


def _loss_per_request(
    target_logp: torch.Tensor,
    kl_logp: torch.Tensor,
    init_kl_logp: torch.Tensor,
    problem: _Problem,
    target_active: torch.Tensor,
    active: torch.Tensor,
    delta: torch.Tensor,
    init_norm: torch.Tensor,
    hparams: ZOptimizationParams,
) -> torch.Tensor:
    """The loss of each ``active`` request from the log-probabilities of its target tokens
    (``target_active`` marks them among all) and of its KL prompt, on the delta's device."""
    device = target_logp.device
    target_active, active = target_active.to(device), active.to(device)
    n_requests = len(active)
    n_seq = len(problem.seq_request)
    target_seq = problem.target_seq.to(device)[target_active]
    per_seq = torch.zeros(n_seq, device=device, dtype=torch.float32).index_add(0, target_seq, -target_logp.float())
    n_rewrite = len(problem.seq_weight)
    per_seq = per_seq[:n_rewrite] / problem.seq_target_len.to(device)
    weighted = per_seq * problem.seq_weight.to(device)
    nll = torch.zeros(n_requests, device=device).index_add(0, problem.seq_request[:n_rewrite].to(device), weighted)[active]
    # kl_div(input=init, target=current) as in the reference: sum p_cur (log p_cur - log p_init).
    kl = (kl_logp.exp() * (kl_logp - init_kl_logp)).sum(-1)
    on_delta = active.to(delta.device)
    weight_decay = hparams.v_weight_decay * delta[on_delta].norm(dim=-1) / init_norm[on_delta] ** 2
    return (nll + hparams.kl_factor * kl).to(delta.device) + weight_decay


def _margin_over_others(log_probs: torch.Tensor, target_logp: torch.Tensor, target_tok: torch.Tensor) -> torch.Tensor:
    """At each target position: the target token's log-probability minus the highest of any
    other token's (non-negative where the target is the most probable token)."""
    others = log_probs.scatter(1, target_tok.unsqueeze(1), float("-inf"))
    return target_logp - others.max(-1).values


def _target_most_probable(target_margin: torch.Tensor, target_req: torch.Tensor, n_requests: int, margin: float) -> torch.Tensor:
    """Per request: whether the new target leads every other token by at least ``margin``
    nats at each of its target positions (``target_margin``, of the tokens ``target_req``
    assigns to requests; a request without any there counts as True)."""
    device = target_req.device
    short = (target_margin.to(device) < margin).float()
    return torch.zeros(n_requests, device=device).index_add(0, target_req, short) == 0


def _plain_logprobs(model: PreTrainedModel, inputs: dict, problem: _Problem, subject_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the target tokens, each one's margin over the most probable other
    token there, and the KL prompts' distributions."""
    log_probs = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
    device = log_probs.device
    at_targets = log_probs[problem.target_seq.to(device), problem.target_pos.to(device)]
    target_logp = at_targets.gather(1, problem.target_tok.to(device).unsqueeze(1)).squeeze(1)
    kl_seq = problem.kl_seq.to(device)
    return target_logp, _margin_over_others(at_targets, target_logp, problem.target_tok.to(device)), log_probs[kl_seq, subject_pos[kl_seq]]


@dataclass
class _Suffix:
    """Each sequence from its subject token on (right-padded to ``width``), with the keys and
    values of the tokens before it (left-padded), which no step changes."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # over prefix then suffix columns
    position_ids: torch.Tensor
    layer_out: torch.Tensor  # the edit layer's unedited output at the suffix tokens
    prefix_cache: list[tuple[torch.Tensor, torch.Tensor]] | None
    target_seq: torch.Tensor
    target_col: torch.Tensor  # suffix column of each target token's logits
    target_tok: torch.Tensor
    kl_seq: torch.Tensor

    def select(self, rows: torch.Tensor) -> "_Suffix":
        """The sequences marked in ``rows``, with their target and KL entries renumbered."""
        if bool(rows.all()):
            return self
        new_index = torch.cumsum(rows, 0) - 1
        targets = rows[self.target_seq]
        return _Suffix(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            position_ids=self.position_ids[rows],
            layer_out=self.layer_out[rows],
            prefix_cache=None if self.prefix_cache is None else [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.prefix_cache],
            target_seq=new_index[self.target_seq[targets]],
            target_col=self.target_col[targets],
            target_tok=self.target_tok[targets],
            kl_seq=new_index[self.kl_seq[rows[self.kl_seq]]],
        )


def _prepare_suffix(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    layer_out: torch.Tensor,
    problem: _Problem,
    subject_pos: torch.Tensor,
    autocast: bool,
) -> _Suffix:
    """Split each sequence at its subject token and run the prefixes once, keeping their keys
    and values: the delta is added at the subject token, so nothing before it ever changes."""
    device = layer_out.device
    lengths = problem.batch.lengths.to(device)
    prefix_len, suffix_len = subject_pos, lengths - subject_pos
    width_p, width_s = int(prefix_len.max()), int(suffix_len.max())
    n = len(lengths)
    ids = inputs["input_ids"].to(device)

    # Prefix columns are left-padded so that every suffix starts at column width_p.
    cols_p = torch.arange(width_p, device=device).expand(n, -1)
    src_p = cols_p - (width_p - prefix_len).unsqueeze(1)
    mask_p = src_p >= 0
    src_p = src_p.clamp(min=0)
    cols_s = torch.arange(width_s, device=device).expand(n, -1)
    src_s = (prefix_len.unsqueeze(1) + cols_s).clamp(max=ids.shape[1] - 1)
    mask_s = cols_s < suffix_len.unsqueeze(1)

    prefix_cache = None
    if width_p > 0:
        with torch.no_grad(), bf16_autocast(autocast, model.device):
            out = model.base_model(
                input_ids=ids.gather(1, src_p), attention_mask=mask_p.long(), position_ids=src_p,
                past_key_values=empty_cache(model), use_cache=True,
            )
        prefix_cache = []
        for keys, values in cache_pairs(out.past_key_values):
            # Padded slots are masked out later, but a NaN there would still poison the
            # attention product, so zero them.
            keep = mask_p[:, None, :, None].to(keys.device)
            prefix_cache.append((keys.masked_fill(~keep, 0), values.masked_fill(~keep, 0)))

    target_seq = problem.target_seq.to(device)
    return _Suffix(
        input_ids=torch.where(mask_s, ids.gather(1, src_s), ids[0, 0]),
        attention_mask=torch.cat([mask_p, mask_s], 1).long(),
        position_ids=prefix_len.unsqueeze(1) + cols_s,
        layer_out=layer_out[torch.arange(n, device=device).unsqueeze(1), src_s].detach(),
        prefix_cache=prefix_cache,
        target_seq=target_seq,
        target_col=problem.target_pos.to(device) - prefix_len[target_seq],
        target_tok=problem.target_tok.to(device),
        kl_seq=problem.kl_seq.to(device),
    )


def _fast_logprobs(
    model: PreTrainedModel,
    layout: ModelLayout,
    layer: int,
    tuple_output: bool,
    suffix: _Suffix,
    seq_delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `_plain_logprobs` returns, computing only the layers above ``layer`` on the
    suffix tokens; ``seq_delta`` is added to the edit layer's output at the subject token
    (suffix column 0) of each sequence."""
    layer_out = suffix.layer_out
    edited = torch.cat([layer_out[:, :1] + seq_delta.to(layer_out.dtype).unsqueeze(1), layer_out[:, 1:]], 1)
    # update() concatenates, so a fresh cache object over the same tensors serves every step.
    cache = cache_from_pairs(model, suffix.prefix_cache) if suffix.prefix_cache is not None else None
    layers = model.get_submodule(layout.layer_tmp.removesuffix(".{}"))
    with skip_layers_below(layers, layer, lambda: edited, tuple_output):
        hidden = first_tensor(
            model.base_model(
                input_ids=suffix.input_ids, attention_mask=suffix.attention_mask, position_ids=suffix.position_ids,
                past_key_values=cache, use_cache=cache is not None,
            ).last_hidden_state
        )
    seqs = torch.cat([suffix.target_seq, suffix.kl_seq]).to(hidden.device)
    cols = torch.cat([suffix.target_col, torch.zeros_like(suffix.kl_seq)]).to(hidden.device)
    logits = model.get_output_embeddings()(hidden[seqs, cols]).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    n_targets = len(suffix.target_seq)
    target_tok = suffix.target_tok.to(log_probs.device)
    target_logp = log_probs[:n_targets].gather(1, target_tok.unsqueeze(1)).squeeze(1)
    return target_logp, _margin_over_others(log_probs[:n_targets], target_logp, target_tok), log_probs[n_targets:]


@contextlib.contextmanager
def _eager_attention(model: PreTrainedModel, enabled: bool = True):
    """The model's eager attention instead of SDPA: on CPUs, SDPA's bfloat16 backward took
    eight times as long as its float32 one, while eager attention's matmuls autocast well."""
    previous = getattr(model.config, "_attn_implementation", None)
    if not enabled or previous != "sdpa" or not set_attn_implementation(model, "eager"):
        yield
        return
    try:
        yield
    finally:
        set_attn_implementation(model, previous)
