"""MEMIT: spread each request's residual over several layers' MLP output projections.

For editing in sequence, the hyperparameters switch on what keeps earlier edits: their keys
in the solve (``preserve_weight``), a norm penalty (``norm_constraint``), target vectors from
the unedited weights (``targets_from_unedited``) and norm anchoring (``norm_anchor``). Every
edit keeps its keys (`memit.editing.preserved`), so a later edit can preserve it.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from memit.editing.base import Editor, EditTask
from memit.editing.common import LayerSolver, context_templates, layer_targets, replaced_weights, second_moments, write_over_layers
from memit.editing.keys import layer_outputs_at_subject
from memit.editing.memit.hparams import MEMITHyperParams
from memit.editing.preserved import earlier_keys_gram, keys_state, unedited_weights
from memit.editing.targets import TargetVectors, key_templates

log = logging.getLogger(__name__)


class MEMITEditor(Editor):
    name = "MEMIT"
    hparams_class = MEMITHyperParams
    hparams: MEMITHyperParams

    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        hp = self.hparams
        solve = self.layer_solver(task)
        templates = context_templates(task.model, task.tok, hp, self.options)
        with task.timed("target_vectors"), self.unedited(task) if hp.targets_from_unedited else contextlib.nullcontext():
            vectors = layer_targets(task.model, task.tok, task.layout, task.requests, hp, templates, self.options)
        targets = self.anchored(task, vectors) if hp.norm_anchor else vectors.target.double()
        return write_over_layers(
            task.model, task.tok, task.layout, task.requests, hp.layers, targets, key_templates(task.tok, templates, hp), solve,
            task.fit, keys_out=task.keys
        )

    def edit_state(self, task: EditTask) -> dict[str, torch.Tensor]:
        """The edited keys, which later edits preserve."""
        return keys_state(task.keys)

    def layer_solver(self, task: EditTask) -> LayerSolver:
        """How each edit layer's update follows from its keys and residuals."""
        hp = self.hparams
        moments = second_moments(task.model, task.tok, task.layout, hp, hp.layers, self.corpus(task.model, task.tok), self.options)
        preserved = {}
        if hp.preserve_weight > 0 and task.earlier:
            preserved = {layer: earlier_keys_gram(task.earlier, layer, self.name) for layer in hp.layers}
            log.info("MEMIT: preserving the keys of %d earlier edit(s) with weight %g", len(task.earlier), hp.preserve_weight)

        def solve(_: int, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            kept = preserved.get(layer)
            if kept is not None and task.rewritten:
                # An earlier edit written again is no longer held at its old output.
                again = keys[-task.rewritten:].double().to(kept.device)
                kept = kept - again.T @ again
            return solve_update(
                keys, residual, moments[layer], hp.mom2_update_weight, kept, hp.preserve_weight, hp.norm_constraint,
            )

        return solve

    @contextlib.contextmanager
    def unedited(self, task: EditTask):
        """The model with the weights it had before the earlier edits, inside the block."""
        weights = task.unedited if task.unedited is not None else unedited_weights(task.earlier)
        with replaced_weights(task.model, weights):
            yield

    def anchored(self, task: EditTask, vectors: TargetVectors) -> torch.Tensor:
        """Each target (float64) rescaled to the norm of the unedited model's output at its
        subject: the targets' own starting point where that was the unedited model."""
        targets, reference = vectors.target.double(), vectors.init
        if not self.hparams.targets_from_unedited and (task.earlier or task.unedited):
            with self.unedited(task):
                reference = layer_outputs_at_subject(task.model, task.tok, task.layout, task.requests, self.hparams.layers[-1])
        reference = reference.to(targets.device, targets.dtype).norm(dim=-1)
        scale = reference / targets.norm(dim=-1).clamp_min(1e-12)
        log.info("Norm anchoring: target norms scaled by %.3f on average (min %.3f, max %.3f)",
                 float(scale.mean()), float(scale.min()), float(scale.max()))
        return targets * scale.unsqueeze(1)


def solve_update(
    keys: torch.Tensor,
    residual: torch.Tensor,
    moment: torch.Tensor,
    weight: float,
    preserved: torch.Tensor | None = None,
    preserve_weight: float = 0.0,
    norm_constraint: float = 0.0,
) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + w·G + K Kᵀ + λₙ I)⁻¹ in float64, with keys and residuals as rows and G
    the Gram matrix of the keys to preserve; returns (out, in).

    The system matrix is built in place in one float64 copy of C (the solve's LU takes one
    more): on an MLP of width 14336 each such matrix is 1.6 GB."""
    keys, residual = keys.double(), residual.double()
    system = moment.to(keys.device, torch.float64, copy=True).mul_(weight).addmm_(keys.T, keys)
    if preserved is not None and preserve_weight > 0:
        system.add_(preserved.to(keys.device, torch.float64), alpha=preserve_weight)
    if norm_constraint > 0:
        system.diagonal().add_(norm_constraint)
    adjusted = torch.linalg.solve(system, keys.T)
    return residual.T @ adjusted.T
