"""AlphaEdit: MEMIT's targets and layer spreading with a null-space-projected update.

Per edit layer, P projects onto the span of the eigenvectors of the key second moment C
whose eigenvalues fall below ``nullspace_threshold`` (directions that the preserved
knowledge hardly uses), and the update solves, in float64,

    (P (K Kᵀ + K_p K_pᵀ) + L2·I) X = P K,    ΔW = R Xᵀ

with K the new keys, R the layer's residuals and K_p the keys of edits made earlier on
this model (sequential editing). ΔW = R Kᵀ P (…)⁻ᵀ lies in the null space: it leaves the
outputs of keys in C's principal subspace (almost) unchanged.

Earlier edits are recognised by the edited weights they produced: after each edit the
editor remembers, under a checksum of the resulting weights, the accumulated K_p K_pᵀ; a
later edit of a model with exactly those weights continues from it, any other model
(a fresh one, or one whose edits were reverted) starts from zero.
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.alphaedit.hparams import AlphaEditHyperParams
from memit.editing.base import Editor, register
from memit.editing.common import applied, context_templates, layer_targets, second_moments, write_over_layers
from memit.editing.keys import compute_keys
from memit.models.layout import ModelLayout
from memit.models.loading import model_fingerprint
from memit.requests import EditRequest

log = logging.getLogger(__name__)

# Null-space projectors of the last edit, keyed by model, layer, statistics and threshold
# (float32 to halve the memory; the solve runs in float64).
_PROJECTORS: dict[tuple, torch.Tensor] = {}
# Accumulated K_p K_pᵀ per layer (float32, as the reference keeps it), keyed by a checksum of
# the edited weights they belong to: the latest edit and the one before it (so that reverting
# the last edit and editing again continues from the earlier keys).
_EDITED_KEYS: OrderedDict[str, dict[int, torch.Tensor]] = OrderedDict()
_MAX_REMEMBERED_EDITS = 2


@register
class AlphaEditEditor(Editor):
    name = "AlphaEdit"
    hparams_class = AlphaEditHyperParams
    hparams: AlphaEditHyperParams

    def compute_deltas(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout, requests: list[EditRequest]
    ) -> dict[str, torch.Tensor]:
        hp = self.hparams
        names = [layout.weight_name(layer) for layer in hp.layers]
        projectors = self.projectors(model, tok, layout)
        previous = _EDITED_KEYS.get(weights_checksum(model, names), {})
        if previous:
            log.info("AlphaEdit: continuing from the keys of earlier edits of this model")
        templates = context_templates(model, tok, hp, self.options)
        targets = layer_targets(model, tok, layout, requests, hp, templates, self.options)

        def solve(i: int, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return solve_projected_update(keys, residual, projectors[layer], previous.get(layer), hp.L2)

        deltas = write_over_layers(model, tok, layout, requests, hp.layers, targets, templates, solve)
        # The edited keys join K_p: recomputed on the edited model, as the reference does.
        with applied(model, deltas):
            accumulated = {}
            for layer in hp.layers:
                keys = compute_keys(model, tok, layout, requests, layer, templates).double()
                accumulated[layer] = (keys.T @ keys + previous.get(layer, 0)).float()
            remember_edited_keys(weights_checksum(model, names), accumulated)
        return deltas

    def projectors(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout) -> dict[int, torch.Tensor]:
        hp = self.hparams
        key_of = lambda layer: (  # noqa: E731
            model_fingerprint(model), layout.mlp_out_name(layer), self.options.corpus or hp.mom2_dataset,
            hp.mom2_n_samples, hp.mom2_max_tokens, hp.mom2_dtype, self.options.autocast, hp.nullspace_threshold,
        )
        wanted = {key_of(layer) for layer in hp.layers}
        for stale in set(_PROJECTORS) - wanted:
            del _PROJECTORS[stale]
        missing = [layer for layer in hp.layers if key_of(layer) not in _PROJECTORS]
        if missing:
            moments = second_moments(model, tok, layout, hp, missing, self.options)
            for layer in missing:
                _PROJECTORS[key_of(layer)] = null_space_projector(moments[layer], hp.nullspace_threshold).float()
                log.info("AlphaEdit layer %d: null space of dimension %d", layer, round(float(_PROJECTORS[key_of(layer)].trace())))
        return {layer: _PROJECTORS[key_of(layer)] for layer in hp.layers}


def null_space_projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U Uᵀ over the eigenvectors of the (symmetric) second moment with eigenvalue < threshold."""
    eigenvalues, eigenvectors = torch.linalg.eigh(moment.double())
    basis = eigenvectors[:, eigenvalues < threshold]
    return basis @ basis.T


def solve_projected_update(
    keys: torch.Tensor, residual: torch.Tensor, projector: torch.Tensor, previous: torch.Tensor | None, ridge: float
) -> torch.Tensor:
    """ΔW (out, in) = R Xᵀ with (P (K Kᵀ + K_p K_pᵀ) + ridge·I) X = P K, in float64; keys and
    residuals as rows."""
    keys, residual, projector = keys.double(), residual.double(), projector.double().to(keys.device)
    gram = keys.T @ keys
    if previous is not None:
        gram = gram + previous.double().to(keys.device)
    system = projector @ gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(system, projector @ keys.T)
    return residual.T @ solution.T


def weights_checksum(model: PreTrainedModel, names: list[str]) -> str:
    """A hash of the exact bits of the named parameters."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(model.get_parameter(name).detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def remember_edited_keys(checksum: str, accumulated: dict[int, torch.Tensor]) -> None:
    _EDITED_KEYS[checksum] = accumulated
    _EDITED_KEYS.move_to_end(checksum)
    while len(_EDITED_KEYS) > _MAX_REMEMBERED_EDITS:
        _EDITED_KEYS.popitem(last=False)


def forget_edited_keys() -> None:
    """Drop every remembered edit (the next edit of any model starts from an empty K_p)."""
    _EDITED_KEYS.clear()
