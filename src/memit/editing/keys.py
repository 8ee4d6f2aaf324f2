"""Hidden vectors at the subject's last token: MLP keys and layer outputs."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.context import ContextTemplates
from memit.editing.prompts import PromptBatch, tokenize_prompts
from memit.models.layout import ModelLayout
from memit.requests import EditRequest
from memit.utils import distributed
from memit.utils.hooks import run_and_capture, skip_layers_below
from memit.utils.progress import progress


@dataclass(frozen=True)
class KeyTemplates:
    """The prompts each request's key is read in: groups of templates whose ``{}`` takes the
    request's prompt, each group averaged, then the group means weighted (weights sum to 1)."""

    groups: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...]

    @classmethod
    def of(cls, templates: "ContextTemplates | KeyTemplates") -> "KeyTemplates":
        """``templates`` as they are, or context templates with every group weighted alike (the paper)."""
        if isinstance(templates, KeyTemplates):
            return templates
        return cls(tuple(tuple(group) for group in templates), (1 / len(templates),) * len(templates))


def vectors_at_subject(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    templates: list[str],
    subjects: list[str],
    module_name: str,
    read: str,
    batch_size: int = 64,
) -> torch.Tensor:
    """The input (``read="input"``) or output of ``module_name`` at each prompt's subject
    token, as ``(len(templates), dim)``; the forward pass stops at that module."""
    return vectors_at_subject_many(model, tok, templates, subjects, [module_name], read, batch_size)[module_name]


def vectors_at_subject_many(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    templates: list[str],
    subjects: list[str],
    module_names: list[str],
    read: str,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """`vectors_at_subject` for several modules (in forward order) from one pass that
    stops at the last of them."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
    starts = range(0, len(templates), batch_size)
    # Thousands of requests times the context templates take minutes: say how far it is.
    for start in progress(starts, desc="vectors at the subject", unit="batches", disable=len(starts) < 16, leave=False):
        batch = tokenize_prompts(tok, templates[start : start + batch_size], subjects[start : start + batch_size])
        with torch.no_grad():
            inputs, outputs = run_and_capture(
                model,
                batch.model_inputs(model.device),
                inputs_of=module_names if read == "input" else [],
                outputs_of=module_names if read == "output" else [],
                stop_after=module_names[-1],
            )
        for name in module_names:
            hidden = (inputs if read == "input" else outputs)[name]
            rows[name].append(hidden[torch.arange(len(hidden)), batch.subject_positions.to(hidden.device)])
    return {name: torch.cat(parts) for name, parts in rows.items()}


def compute_keys(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    layer: int,
    templates: ContextTemplates | KeyTemplates,
) -> torch.Tensor:
    """Each request's key at ``layer``: the MLP-output-projection input at the subject's last
    token, averaged within each group of templates and then across groups (`KeyTemplates`)."""
    return compute_keys_at(model, tok, layout, requests, [layer], templates)[layer]


def compute_keys_at(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    layers: list[int],
    templates: ContextTemplates | KeyTemplates,
) -> dict[int, torch.Tensor]:
    """`compute_keys` at several increasing layers, from one pass over the prompts. In a
    torch.distributed group each process computes the keys of its share of the requests (those
    of 3,000 requests under 11 context templates at 5 layers took 0.4 h on one CPU core)."""
    names = [layout.mlp_out_name(layer) for layer in layers]
    templates = KeyTemplates.of(templates)

    def keys_of(share: list[EditRequest]) -> torch.Tensor:
        flat = _templated(share, templates)
        vectors = vectors_at_subject_many(model, tok, [t for t, _ in flat], [s for _, s in flat], names, "input")
        return torch.stack([_average_over_templates(vectors[name], len(share), templates) for name in names], 1)

    keys = distributed.rows_by_shard(requests, keys_of)
    return {layer: keys[:, i].contiguous() for i, layer in enumerate(layers)}


class KeysAcrossEdits:
    """Each request's key (as `compute_keys`) at increasing layers of one edit, where every layer
    is changed once its keys are read: the residual stream entering the last layer read is kept,
    so the next layer's keys compute only the layers from there up instead of every layer below
    (MEMIT's five layers: 13 layer passes instead of 35), with the same result. The kept
    residuals are at most ``budget_bytes`` (beyond it each layer's keys are computed from the
    embeddings); in a torch.distributed group each process keeps those of its share."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        layout: ModelLayout,
        requests: list[EditRequest],
        templates: ContextTemplates | KeyTemplates,
        budget_bytes: int = 2**30,
        batch_size: int = 64,
    ):
        self.model, self.tok, self.layout, self.requests = model, tok, layout, requests
        self.templates, self.budget_bytes, self.batch_size = KeyTemplates.of(templates), budget_bytes, batch_size
        self._batches: list[PromptBatch] = []
        self._kept: list[torch.Tensor] = []
        self._resume_at: int | None = None  # the layer whose input ``_kept`` holds
        self._tuple_output = False

    def at(self, layer: int) -> torch.Tensor:
        """The keys at ``layer`` (above every layer read before), one row per request."""
        if self._resume_at is not None and layer <= self._resume_at:  # not above the last: start from the embeddings
            self._kept, self._resume_at = [], None
        return distributed.rows_by_shard(self.requests, lambda share: self._keys_of(share, layer))

    def _keys_of(self, share: list[EditRequest], layer: int) -> torch.Tensor:
        if not self._batches:
            flat = _templated(share, self.templates)
            self._batches = [tokenize_prompts(self.tok, [t for t, _ in flat[i : i + self.batch_size]], [s for _, s in flat[i : i + self.batch_size]])
                             for i in range(0, len(flat), self.batch_size)]
        name, below = self.layout.mlp_out_name(layer), self.layout.layer_name(layer - 1) if layer > 0 else None
        layers = self.model.get_submodule(self.layout.layer_tmp.removesuffix(".{}"))
        rows, kept, kept_bytes = [], [], 0
        for i, batch in enumerate(progress(self._batches, desc="keys", unit="batches", disable=len(self._batches) < 16, leave=False)):
            with contextlib.ExitStack() as stack, torch.no_grad():
                if self._resume_at is not None:
                    stack.enter_context(skip_layers_below(layers, self._resume_at - 1, lambda i=i: self._kept[i], self._tuple_output))
                elif below is not None:  # what a layer standing in for it must return: a tuple (older transformers) or a tensor
                    handle = layers[layer - 1].register_forward_hook(lambda m, a, out: setattr(self, "_tuple_output", isinstance(out, tuple)))
                    stack.callback(handle.remove)
                inputs, outputs = run_and_capture(self.model, batch.model_inputs(self.model.device), inputs_of=[name],
                                                  outputs_of=[below] if below else [], stop_after=name)
            hidden = inputs[name]
            rows.append(hidden[torch.arange(len(hidden)), batch.subject_positions.to(hidden.device)])
            if below is not None and kept_bytes <= self.budget_bytes:
                kept.append(outputs[below])
                kept_bytes += outputs[below].numel() * outputs[below].element_size()
        fits = below is not None and kept_bytes <= self.budget_bytes
        self._kept, self._resume_at = (kept, layer) if fits else ([], None)
        return _average_over_templates(torch.cat(rows), len(share), self.templates)


def _templated(requests: list[EditRequest], templates: KeyTemplates) -> list[tuple[str, str]]:
    """(template, subject) of every request under every key template, request by request."""
    return [(c.replace("{}", r.prompt, 1), r.subject) for r in requests for group in templates.groups for c in group]


def _average_over_templates(vectors: torch.Tensor, n_requests: int, templates: KeyTemplates) -> torch.Tensor:
    per_request = vectors.view(n_requests, -1, vectors.shape[-1])
    group_means, start = [], 0
    for group in templates.groups:
        group_means.append(per_request[:, start : start + len(group)].float().mean(1))
        start += len(group)
    means = torch.stack(group_means, 1)
    if len(set(templates.weights)) == 1:  # the paper's plain mean, to the last bit
        return means.mean(1)
    weights = torch.tensor(templates.weights, dtype=means.dtype, device=means.device)
    return (means * weights[:, None]).sum(1)


def layer_outputs_at_subject(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout, requests: list[EditRequest], layer: int
) -> torch.Tensor:
    """The residual stream after ``layer`` at the subject's last token of each bare prompt
    (split across the processes of a torch.distributed group)."""

    def outputs_of(share: list[EditRequest]) -> torch.Tensor:
        return vectors_at_subject(model, tok, [r.prompt for r in share], [r.subject for r in share], layout.layer_name(layer), "output").float()

    return distributed.rows_by_shard(requests, outputs_of)
