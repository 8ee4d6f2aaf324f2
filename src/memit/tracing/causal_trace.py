"""Causal tracing (Meng et al. 2022, ROME, section 2): where in the network a fact is recalled.

For a prompt whose next token the model predicts (the "answer"), the subject's token
embeddings are corrupted with Gaussian noise, which usually destroys the prediction; then a
single state of the clean run is restored inside the corrupted run, and the probability of
the answer measures how much that state alone carries the fact. States are:

- ``hidden``: the output of decoder layer ``l`` at token ``t``;
- ``mlp`` / ``attn``: the MLP or attention output at token ``t`` in a window of ``window``
  consecutive layers around ``l`` (the paper's 10), which shows the role of a whole band.

As in the paper's code, the same noise samples (one seed per prompt) are used for every
restoration, so the scores differ only in what is restored. All restorations of one layer
(every token times every noise sample) run as one batch, and the layers below the restored
window, which compute the same corrupted states for every restoration, are replayed from one
corrupted pass instead of computed again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.errors import InputError
from memit.models.layout import ModelLayout
from memit.utils.hooks import first_tensor, run_and_capture, skip_layers_below, with_first_tensor

KINDS = ("hidden", "mlp", "attn")
NOISE_MULTIPLIER = 3.0  # times the standard deviation of the subjects' embeddings (the paper's)
_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


@dataclass
class Trace:
    """The answer's probability after restoring each (token, layer) state of one kind."""

    prompt: str
    subject: str
    kind: str
    window: int
    tokens: list[str]
    subject_range: tuple[int, int]  # [first, last + 1) token of the subject
    answer: str
    answer_id: int
    high: float  # clean run
    low: float  # corrupted run, nothing restored
    scores: list[list[float]] = field(default_factory=list)  # [token][layer]


def state_names(model: nn.Module, layout: ModelLayout, kind: str) -> list[str]:
    """The module whose output is the traced state, per layer."""
    if kind == "hidden":
        return [layout.layer_name(i) for i in range(layout.num_layers)]
    if kind == "mlp":
        return [layout.mlp_out_name(i) for i in range(layout.num_layers)]
    if kind == "attn":
        children = dict(layout.layer(model, 0).named_children())
        name = next((n for n in _ATTENTION_NAMES if n in children), None)
        if name is None:
            raise InputError(f"kind: no attention module among {sorted(children)} of {type(model).__name__}'s layers")
        return [f"{layout.layer_name(i)}.{name}" for i in range(layout.num_layers)]
    raise InputError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")


def restored_layers(kind: str, layer: int, window: int, num_layers: int) -> list[int]:
    """The layers restored for the state at ``layer``: itself for ``hidden``, else the window
    ``[layer - window // 2, layer + window - window // 2)`` clipped to the model, as the paper."""
    if kind == "hidden":
        return [layer]
    return list(range(max(0, layer - window // 2), min(num_layers, layer + window - window // 2)))


def subject_range(tok: PreTrainedTokenizerBase, prompt: str, subject: str) -> tuple[int, int]:
    """The subject's token span in ``prompt`` (its first occurrence)."""
    if subject not in prompt:
        raise InputError(f"subject: {subject!r} does not occur in the prompt {prompt!r}")
    first = prompt.index(subject)
    last = first + len(subject)
    if getattr(tok, "is_fast", False):
        offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < last and b > first]
        return inside[0], inside[-1] + 1
    # A slow tokenizer: a space before the subject belongs to the subject's first token.
    prefix = prompt[:first].rstrip()
    return len(tok(prefix)["input_ids"]), len(tok(prompt[:last])["input_ids"])


def noise_level(model: PreTrainedModel, tok: PreTrainedTokenizerBase, subjects: list[str]) -> float:
    """``NOISE_MULTIPLIER`` times the standard deviation of the embeddings of the subjects' tokens."""
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise InputError("subjects: no tokens to measure the embeddings' spread on")
    embeddings = model.get_input_embeddings()
    with torch.no_grad():
        vectors = embeddings(torch.tensor(ids, device=embeddings.weight.device))
    return NOISE_MULTIPLIER * float(vectors.float().std())


@contextlib.contextmanager
def corrupted_subject(model: PreTrainedModel, span: tuple[int, int], noise: torch.Tensor) -> Iterator[None]:
    """Embeddings of every row get ``noise`` (rows are noise samples, repeated in order) added
    at the subject's tokens."""
    def add_noise(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        rows = output.shape[0]
        repeats = noise.to(output.device, output.dtype).repeat(rows // noise.shape[0], 1, 1)
        output = output.clone()
        output[:, span[0] : span[1]] += repeats
        return output

    handle = model.get_input_embeddings().register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def restoring(model: nn.Module, clean: dict[str, torch.Tensor], plan: dict[str, list[tuple[int, int]]]) -> Iterator[None]:
    """While active, module ``name`` outputs the clean state at (row, token) for each pair in
    ``plan[name]``; ``clean[name]`` is its clean output ``(tokens, dim)``."""
    handles = []

    def make_hook(name: str):
        rows = torch.tensor([r for r, _ in plan[name]], dtype=torch.long)
        tokens = torch.tensor([t for _, t in plan[name]], dtype=torch.long)

        def hook(module: nn.Module, args: tuple, output):
            hidden = first_tensor(output).clone()
            hidden[rows.to(hidden.device), tokens.to(hidden.device)] = clean[name].to(hidden.device, hidden.dtype)[tokens.to(hidden.device)]
            return with_first_tensor(output, hidden)

        return hook

    try:
        for name, pairs in plan.items():
            if pairs:
                handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def _outputs_and_logits(model: PreTrainedModel, input_ids: torch.Tensor, names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The outputs of ``names`` and the last position's logits, from one pass."""
    head = _head_name(model)
    with torch.no_grad():
        _, outputs = run_and_capture(model, {"input_ids": input_ids}, outputs_of=[*names, head])
    return {name: outputs[name].detach() for name in names}, outputs[head][:, -1].float()


def _corrupted_layer_outputs(model: PreTrainedModel, layout: ModelLayout, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], bool, torch.Tensor]:
    """Every decoder layer's output in the corrupted run, whether layers return tuples, and
    the last position's logits."""
    names = [layout.layer_name(i) for i in range(layout.num_layers)]
    kinds: list[bool] = []
    hook = layout.layer(model, 0).register_forward_hook(lambda mod, args, out: kinds.append(isinstance(out, tuple)))
    try:
        outputs, logits = _outputs_and_logits(model, input_ids, names)
    finally:
        hook.remove()
    return [outputs[name] for name in names], kinds[0], logits


@contextlib.contextmanager
def _replayed(model: nn.Module, layout: ModelLayout, below: int, source: torch.Tensor | None, tuple_output: bool) -> Iterator[None]:
    """Layers ``0..below`` output ``source`` without being computed (nothing when ``below`` < 0)."""
    if below < 0 or source is None:
        yield
        return
    layers = model.get_submodule(layout.layer_tmp.removesuffix(".{}"))
    with skip_layers_below(layers, below, lambda: source, tuple_output):
        yield


def answer_probs(model: PreTrainedModel, input_ids: torch.Tensor, answer_id: int) -> torch.Tensor:
    """p(answer) after the last token, per row."""
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[:, -1].float()
    return torch.softmax(logits, dim=-1)[:, answer_id]


def trace_prompt(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    prompt: str,
    subject: str,
    kind: str,
    noise: float,
    samples: int = 10,
    window: int = 10,
    seed: int = 0,
    answer_id: int | None = None,
    max_rows: int = 512,
    replay_lower_layers: bool = True,
) -> Trace:
    """The trace of one prompt: scores for every (token, layer), with the clean and corrupted
    probabilities of the answer (the model's own prediction unless ``answer_id`` is given)."""
    names = state_names(model, layout, kind)
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([tok(prompt)["input_ids"]], device=device)
    span = subject_range(tok, prompt, subject)
    clean_states, clean_logits = _outputs_and_logits(model, ids, names)
    clean = {name: state[0] for name, state in clean_states.items()}
    logits = clean_logits[0]
    answer_id = int(logits.argmax()) if answer_id is None else answer_id
    high = float(torch.softmax(logits, -1)[answer_id])

    generator = torch.Generator().manual_seed(seed)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    sample_noise = noise * torch.randn(samples, span[1] - span[0], hidden_size, generator=generator)
    n_tokens = ids.shape[1]
    scores = torch.zeros(n_tokens, layout.num_layers)
    with corrupted_subject(model, span, sample_noise):
        corrupted, tuple_output, corrupted_logits = _corrupted_layer_outputs(model, layout, ids.repeat(samples, 1))
        low = float(torch.softmax(corrupted_logits, dim=-1)[:, answer_id].mean())
        tokens_per_pass = max(1, max_rows // samples)
        for layer in range(layout.num_layers):
            restored = restored_layers(kind, layer, window, layout.num_layers)
            window_names = [names[i] for i in restored]
            for first in range(0, n_tokens, tokens_per_pass):
                chunk = list(range(first, min(n_tokens, first + tokens_per_pass)))
                pairs = [(row, t) for row, t in enumerate(t for t in chunk for _ in range(samples))]
                below = restored[0] - 1 if replay_lower_layers else -1
                source = corrupted[below].repeat(len(chunk), 1, 1) if below >= 0 else None
                with restoring(model, clean, {name: pairs for name in window_names}), _replayed(model, layout, below, source, tuple_output):
                    probs = answer_probs(model, ids.repeat(len(chunk) * samples, 1), answer_id)
                scores[chunk, layer] = probs.view(len(chunk), samples).mean(1).cpu()
    return Trace(
        prompt=prompt,
        subject=subject,
        kind=kind,
        window=window if kind != "hidden" else 1,
        tokens=[tok.decode([i]) for i in ids[0].tolist()],
        subject_range=span,
        answer=tok.decode([answer_id]),
        answer_id=answer_id,
        high=high,
        low=low,
        scores=scores.tolist(),
    )


__all__ = [
    "KINDS",
    "NOISE_MULTIPLIER",
    "Trace",
    "answer_probs",
    "corrupted_subject",
    "noise_level",
    "restored_layers",
    "restoring",
    "state_names",
    "subject_range",
    "trace_prompt",
]
