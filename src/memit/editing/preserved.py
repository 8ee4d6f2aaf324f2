"""What an edit keeps for the edits made after it on the same model: its keys at each edit
layer, which a later least-squares solve preserves (MEMIT with ``preserve_weight``, AlphaEdit),
and the weights from before the first edit (targets from the unedited model).

An edit keeps, per layer, whichever is smaller: its keys (one row per request) while a batch
has fewer requests than the layer is wide, else their Gram matrix Σ k kᵀ. Only the Gram ever
enters a solve, so a long sequence can also be carried as one running Gram per layer
(`memit.chain.EditChain`): its memory does not grow with the number of edits.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from memit.deltas import WeightDeltas
from memit.errors import InputError


def keys_name(layer: int) -> str:
    return f"keys.layer{layer}"


def gram_name(layer: int) -> str:
    return f"keys_gram.layer{layer}"


def keys_state(keys: Mapping[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state an edit keeps of its keys (rows) at each layer."""
    state = {}
    for layer, k in keys.items():
        if k.shape[0] < k.shape[1]:
            state[keys_name(layer)] = k.float().cpu()
        else:
            state[gram_name(layer)] = (k.double().T @ k.double()).cpu()
    return state


def edit_gram(edit: WeightDeltas, layer: int) -> torch.Tensor | None:
    """Σ k kᵀ (float64) of one edit's keys at ``layer``; None if the edit kept none."""
    if gram_name(layer) in edit.state:
        return edit.state[gram_name(layer)].double()
    if keys_name(layer) in edit.state:
        keys = edit.state[keys_name(layer)].double()
        return keys.T @ keys
    return None


def earlier_keys_gram(earlier: Sequence[WeightDeltas], layer: int, method: str) -> torch.Tensor | None:
    """Σ K_p K_pᵀ (float64) over the earlier edits' keys at ``layer``; None without earlier edits."""
    total = None
    for i, edit in enumerate(earlier):
        gram = edit_gram(edit, layer)
        if gram is None:
            raise InputError(
                f"earlier[{i}]: this {edit.manifest.get('algorithm', 'unknown')} edit kept no keys for layer {layer}, "
                f"so {method} cannot preserve it; edits saved by memit's MEMIT or AlphaEdit of the same layers keep "
                "them (edits saved before keys were kept must be made again)"
            )
        total = gram if total is None else total + gram
    return total


def unedited_weights(earlier: Sequence[WeightDeltas]) -> dict[str, torch.Tensor]:
    """The weights that ``earlier`` (applied, oldest first) changed, as they were before the first of them."""
    weights: dict[str, torch.Tensor] = {}
    for i, edit in enumerate(earlier):
        if edit.deltas and not edit.applied:
            raise InputError(
                f"earlier[{i}]: not applied to this model, so the weights from before it are unknown; "
                "apply it (WeightDeltas.apply) before editing on top of it"
            )
        for name, original in edit.original_weights().items():
            weights.setdefault(name, original)
    return weights
