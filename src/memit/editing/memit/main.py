"""MEMIT: spread each request's residual over several layers' MLP output projections."""
from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.base import Editor, register
from memit.editing.context import get_context_templates
from memit.editing.keys import compute_keys, layer_outputs_at_subject
from memit.editing.memit.hparams import MEMITHyperParams
from memit.editing.targets import compute_targets
from memit.models.layout import ModelLayout
from memit.requests import EditRequest
from memit.stats import SecondMomentCache, resolve_corpus

log = logging.getLogger(__name__)


@register
class MEMITEditor(Editor):
    name = "MEMIT"
    hparams_class = MEMITHyperParams
    hparams: MEMITHyperParams

    def compute_deltas(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout, requests: list[EditRequest]
    ) -> dict[str, torch.Tensor]:
        hp, opts = self.hparams, self.options
        moments = self.second_moments(model, tok, layout)
        templates = get_context_templates(model, tok, hp.context_template_length_params, seed=opts.seed)
        z_layer = hp.layers[-1]
        targets = compute_targets(
            model, tok, layout, requests, hp, templates, z_layer,
            batch_size=opts.batch_size, fast=opts.fast, autocast=opts.autocast,
        ).target.double()
        return spread_over_layers(model, tok, layout, requests, hp, targets, moments, templates)

    def second_moments(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout) -> dict[int, torch.Tensor]:
        hp = self.hparams
        corpus = resolve_corpus(self.options.corpus or hp.mom2_dataset, model, tok)
        return SecondMomentCache(self.options.stats_dir).get(
            model, tok, layout, hp.layers, corpus, hp.mom2_n_samples, hp.mom2_max_tokens, hp.mom2_dtype,
            autocast=self.options.autocast,
        )


def spread_over_layers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    hp: MEMITHyperParams,
    targets: torch.Tensor,
    moments: dict[int, torch.Tensor],
    templates: list[list[str]],
) -> dict[str, torch.Tensor]:
    """Write the targets layer by layer: each layer takes its share of the remaining residual,
    and later layers see the earlier layers' updates. ``model`` is restored afterwards."""
    z_layer = hp.layers[-1]
    deltas: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    try:
        for i, layer in enumerate(hp.layers):
            keys = compute_keys(model, tok, layout, requests, layer, templates).double()
            current = layer_outputs_at_subject(model, tok, layout, requests, z_layer).double()
            residual = (targets - current) / (len(hp.layers) - i)
            update = solve_update(keys, residual, moments[layer].double(), hp.mom2_update_weight)
            weight = layout.mlp_out(model, layer).weight
            delta = layout.as_weight(update).float()
            name = layout.weight_name(layer)
            log.info("layer %d: residual norm %.3f, update norm %.3f, weight norm %.3f",
                     layer, residual.norm(), update.norm(), weight.norm())
            originals[name] = weight.detach().clone()
            with torch.no_grad():
                weight.add_(delta.to(weight.dtype))
            deltas[name] = delta
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                model.get_parameter(name).copy_(original)
    return deltas


def solve_update(keys: torch.Tensor, residual: torch.Tensor, moment: torch.Tensor, weight: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ in float64, with keys and residuals as rows; returns (out, in)."""
    keys, residual, moment = keys.double(), residual.double(), moment.double().to(keys.device)
    adjusted = torch.linalg.solve(weight * moment + keys.T @ keys, keys.T)
    return residual.T @ adjusted.T
