"""What the exporters share: the model as it was before the deltas, and a quick check that
exported weights still make the edits (each edit's own prompt, scored)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.predict import score_continuations
from memit.requests import EditRequest, parse_requests


def edit_requests(manifest: dict[str, Any]) -> list[EditRequest]:
    """The requests recorded in a deltas manifest (none when it has none)."""
    return parse_requests(manifest.get("requests") or [])


def efficacy(model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest]) -> float | None:
    """The share of ``requests`` the model makes: with a ``target_true``, the new target is
    the more likely one (mean NLL per token, CounterFact's efficacy score); without, the
    new target's first token is the model's top prediction. None without requests."""
    if not requests:
        return None
    prompts = [r.filled_prompt() for r in requests]
    new = score_continuations(model, tok, prompts, [r.target_new for r in requests])
    with_true = [i for i, r in enumerate(requests) if r.target_true is not None]
    true = score_continuations(model, tok, [prompts[i] for i in with_true], [requests[i].target_true for i in with_true])
    true_by_row = dict(zip(with_true, true))
    made = [
        new[i].mean_nll < true_by_row[i].mean_nll if i in true_by_row else new[i].argmax_matches[0]
        for i in range(len(requests))
    ]
    return sum(made) / len(made)


def efficacy_with(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, deltas: Any, weights: dict[str, torch.Tensor]
) -> float | None:
    """`efficacy` of the manifest's requests with ``weights`` (additive changes, by
    parameter name) added to the model in memory, then reverted bit for bit."""
    # The deltas' own class (WeightDeltas) applies and reverts exactly; taken from the object
    # because memit.deltas imports this package.
    merged = type(deltas)(weights, dict(deltas.manifest)).apply(model, force=True)
    try:
        return efficacy(model, tok, edit_requests(deltas.manifest))
    finally:
        merged.revert(model)


@contextlib.contextmanager
def unedited(deltas: Any, model: PreTrainedModel | None) -> Iterator[None]:
    """``model`` without ``deltas`` inside the block. Deltas as `memit.edit_model`
    returns them are applied (to ``model``, which they must have been applied to): they are
    reverted for the block and applied again after it."""
    if model is None or not deltas.applied:
        yield
        return
    deltas.revert(model)
    try:
        yield
    finally:
        deltas.apply(model)
