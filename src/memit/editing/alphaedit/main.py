"""AlphaEdit: MEMIT's targets and layer spreading with a null-space-projected update.

Per edit layer, P projects onto the span of the eigenvectors of the key second moment C
whose eigenvalues fall below ``nullspace_threshold`` (directions that the preserved
knowledge hardly uses), and the update solves, in float64,

    (P (K Kᵀ + K_p K_pᵀ) + L2·I) X = P K,    ΔW = R Xᵀ

with K the new keys, R the layer's residuals and K_p the keys of the edits made earlier on
this model (sequential editing). ΔW = R Kᵀ P (…)⁻ᵀ lies in the null space: it leaves the
outputs of keys in C's principal subspace (almost) unchanged.

Each edit keeps its keys on the edited model, as the reference does, in its
`WeightDeltas.state` (memit.editing.preserved); an edit made on top of earlier ones gets
them through ``earlier``.
"""
from __future__ import annotations

import logging

import torch

from memit.editing.alphaedit.hparams import AlphaEditHyperParams
from memit.editing.base import EditOptions, EditTask
from memit.editing.common import LayerSolver, second_moments
from memit.editing.memit.main import MEMITEditor
from memit.editing.preserved import earlier_keys_gram
from memit.models.loading import model_fingerprint

log = logging.getLogger(__name__)


class AlphaEditEditor(MEMITEditor):
    """MEMIT with the null-space-projected solve."""

    name = "AlphaEdit"
    hparams_class = AlphaEditHyperParams
    hparams: AlphaEditHyperParams

    def __init__(self, hparams: AlphaEditHyperParams, options: EditOptions | None = None):
        super().__init__(hparams, options)
        # Null-space projectors (float32 to halve the memory; the solve runs in float64), kept
        # so that the batches of a sequential run decompose C once.
        self._projectors: dict[tuple, torch.Tensor] = {}

    def layer_solver(self, task: EditTask) -> LayerSolver:
        hp = self.hparams
        projectors = self.projectors(task)
        preserved = {layer: earlier_keys_gram(task.earlier, layer, self.name) for layer in hp.layers}
        if task.earlier:
            log.info("AlphaEdit: preserving the keys of %d earlier edit(s)", len(task.earlier))

        def solve(_: int, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return solve_projected_update(keys, residual, projectors[layer], preserved[layer], hp.L2)

        return solve

    def projectors(self, task: EditTask) -> dict[int, torch.Tensor]:
        hp = self.hparams
        corpus = self.corpus(task.model, task.tok)
        key_of = lambda layer: (  # noqa: E731
            model_fingerprint(task.model), task.layout.mlp_out_name(layer), corpus.identity,
            hp.mom2_n_samples, hp.mom2_max_tokens, hp.mom2_dtype, self.options.autocast, hp.nullspace_threshold,
        )
        missing = [layer for layer in hp.layers if key_of(layer) not in self._projectors]
        if missing:
            moments = second_moments(task.model, task.tok, task.layout, hp, missing, corpus, self.options)
            for layer in missing:
                projector = null_space_projector(moments[layer], hp.nullspace_threshold).float()
                self._projectors[key_of(layer)] = projector
                log.info("AlphaEdit layer %d: null space of dimension %d", layer, round(float(projector.trace())))
        return {layer: self._projectors[key_of(layer)] for layer in hp.layers}


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
