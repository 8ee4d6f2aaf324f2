"""MEMIT: spread each request's residual over several layers' MLP output projections."""
from __future__ import annotations

import torch

from memit.editing.base import Editor, EditTask
from memit.editing.common import LayerSolver, context_templates, layer_targets, second_moments, write_over_layers
from memit.editing.memit.hparams import MEMITHyperParams


class MEMITEditor(Editor):
    name = "MEMIT"
    hparams_class = MEMITHyperParams
    hparams: MEMITHyperParams

    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        hp = self.hparams
        solve = self.layer_solver(task)
        templates = context_templates(task.model, task.tok, hp, self.options)
        with task.timed("target_vectors"):
            targets = layer_targets(task.model, task.tok, task.layout, task.requests, hp, templates, self.options)
        return write_over_layers(task.model, task.tok, task.layout, task.requests, hp.layers, targets, templates, solve, task.fit)

    def layer_solver(self, task: EditTask) -> LayerSolver:
        """How each edit layer's update follows from its keys and residuals."""
        hp = self.hparams
        moments = second_moments(task.model, task.tok, task.layout, hp, hp.layers, self.corpus(task.model, task.tok), self.options)

        def solve(_: int, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return solve_update(keys, residual, moments[layer], hp.mom2_update_weight)

        return solve


def solve_update(keys: torch.Tensor, residual: torch.Tensor, moment: torch.Tensor, weight: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ in float64, with keys and residuals as rows; returns (out, in).

    The system matrix is built in place in one float64 copy of C (the solve's LU takes one
    more): on an MLP of width 14336 each such matrix is 1.6 GB."""
    keys, residual = keys.double(), residual.double()
    system = moment.to(keys.device, torch.float64, copy=True).mul_(weight).addmm_(keys.T, keys)
    adjusted = torch.linalg.solve(system, keys.T)
    return residual.T @ adjusted.T
