"""ROME: a rank-one update ΔW = v uᵀ at one layer, written request after request.

Per request, with the model edited by the requests before it: the key k* is the MLP output
projection's input at the subject's last token, averaged over the context templates; the
left vector is u = C⁻¹k* / ‖C⁻¹k*‖; the target v* is the MLP output at the subject that
makes the model say ``target_new`` (the shared z optimisation with the delta placed at the
MLP output); the right vector is (v* − W k) / (k · u), with k and W k the projection's input
and output on the bare prompt, so that the edited weight maps k to v*.
"""
from __future__ import annotations

import logging

import torch

from memit.editing.base import Editor, EditTask
from memit.editing.common import add_deltas, applied, context_templates, second_moments
from memit.editing.context import ContextTemplates
from memit.editing.keys import compute_keys, vectors_at_subject
from memit.editing.rome.hparams import ROMEHyperParams
from memit.editing.targets import compute_targets, key_templates
from memit.requests import EditRequest
from memit.utils.devices import float64_device
from memit.utils.progress import progress

log = logging.getLogger(__name__)


class ROMEEditor(Editor):
    name = "ROME"
    hparams_class = ROMEHyperParams
    hparams: ROMEHyperParams

    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        hp = self.hparams
        moments = second_moments(task.model, task.tok, task.layout, hp, hp.layers, self.corpus(task.model, task.tok), self.options) if hp.mom2_adjustment else {}
        templates = context_templates(task.model, task.tok, hp, self.options)
        total: dict[str, torch.Tensor] = {}
        requests = progress(task.requests, desc="ROME requests", unit="requests", logger=log, disable=len(task.requests) <= 1, leave=False)
        for n, request in enumerate(requests):
            # Each request sees the model as edited by the ones before it, as in the paper.
            with applied(task.model, total):
                step = self.request_deltas(task, request, templates, moments)
            log.info("ROME request %d/%d: update norms %s", n + 1, len(task.requests),
                     {k: round(float(v.norm()), 3) for k, v in step.items()})
            total = add_deltas(total, step)
        return total

    def request_deltas(
        self, task: EditTask, request: EditRequest, templates: ContextTemplates, moments: dict[int, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One request's rank-one updates at the edit layers, each layer seeing the previous ones."""
        deltas: dict[str, torch.Tensor] = {}
        for layer in self.hparams.layers:
            with applied(task.model, deltas):
                delta = self.rank_one_update(task, request, templates, layer, moments.get(layer))
            deltas[task.layout.weight_name(layer)] = task.layout.as_weight(delta).float()
        return deltas

    def rank_one_update(
        self, task: EditTask, request: EditRequest, templates: ContextTemplates, layer: int, moment: torch.Tensor | None
    ) -> torch.Tensor:
        """ΔW (out, in) for one request at ``layer`` of the model as it is now."""
        model, tok, layout = task.model, task.tok, task.layout
        solve_on = float64_device(layout.mlp_out(model, layer).weight.device)
        keys_at = key_templates(tok, templates, self.hparams)
        left = left_vector(compute_keys(model, tok, layout, [request], layer, keys_at)[0].to(solve_on), moment)
        name = layout.mlp_out_name(layer)
        key = vectors_at_subject(model, tok, [request.prompt], [request.subject], name, "input")[0].to(solve_on).double()
        # v* − W k: the weight then maps this prompt's key k to v*.
        change = self.value_change(task, request, templates, layer).to(solve_on)
        right = change / torch.dot(key, left)
        log.info("layer %d: target change %.3f, division factor %.4f, right vector norm %.3f",
                 layer, change.norm(), torch.dot(key, left), right.norm())
        return torch.outer(right, left)

    def value_change(self, task: EditTask, request: EditRequest, templates: ContextTemplates, layer: int) -> torch.Tensor:
        """The optimised change δ of the MLP output at the subject (v* = W k + δ).

        Adding δ to the MLP output equals adding it to the layer output there, so the shared
        z optimisation at ``layer`` computes it, with the clamp (‖δ‖ ≤ factor·‖v‖) and the
        weight decay (‖δ‖/‖v‖²) measured against the MLP output v as in ROME.
        """
        opts = self.options
        with task.timed("target_vectors"):
            vectors = compute_targets(
                task.model, task.tok, task.layout, [request], self.hparams, templates, layer,
                init_module=task.layout.mlp_out_name(layer), batch_size=1, fast=opts.fast, autocast=opts.autocast,
                cache_dir=opts.target_cache,
            )
        log.info("layer %d: z loss %.4f", layer, float(vectors.final_loss[0]))
        return vectors.delta[0].double()


def left_vector(key: torch.Tensor, moment: torch.Tensor | None) -> torch.Tensor:
    """u = C⁻¹k / ‖C⁻¹k‖ in float64 (k / ‖k‖ without the second moment)."""
    u = key.double()
    if moment is not None:
        u = torch.linalg.solve(moment.double().to(u.device), u)
    return u / u.norm()
