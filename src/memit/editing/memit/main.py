"""MEMIT: spread each request's residual over several layers' MLP output projections."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.editing.base import Editor, register
from memit.editing.common import context_templates, layer_targets, second_moments, write_over_layers
from memit.editing.context import ContextTemplates
from memit.editing.memit.hparams import MEMITHyperParams
from memit.models.layout import ModelLayout
from memit.requests import EditRequest

log = logging.getLogger(__name__)


@register
class MEMITEditor(Editor):
    name = "MEMIT"
    hparams_class = MEMITHyperParams
    hparams: MEMITHyperParams

    def compute_deltas(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        layout: ModelLayout,
        requests: list[EditRequest],
        earlier: Sequence[WeightDeltas] = (),
    ) -> dict[str, torch.Tensor]:
        hp = self.hparams
        moments = self.second_moments(model, tok, layout)
        templates = context_templates(model, tok, hp, self.options)
        targets = layer_targets(model, tok, layout, requests, hp, templates, self.options)
        return spread_over_layers(model, tok, layout, requests, hp, targets, moments, templates)

    def second_moments(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout) -> dict[int, torch.Tensor]:
        return second_moments(model, tok, layout, self.hparams, self.hparams.layers, self.options)


def spread_over_layers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    hp: MEMITHyperParams,
    targets: torch.Tensor,
    moments: dict[int, torch.Tensor],
    templates: ContextTemplates,
) -> dict[str, torch.Tensor]:
    """MEMIT's update at every edit layer; ``model`` is restored afterwards."""

    def solve(_: int, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return solve_update(keys, residual, moments[layer], hp.mom2_update_weight)

    return write_over_layers(model, tok, layout, requests, hp.layers, targets, templates, solve)


def solve_update(keys: torch.Tensor, residual: torch.Tensor, moment: torch.Tensor, weight: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ in float64, with keys and residuals as rows; returns (out, in)."""
    keys, residual, moment = keys.double(), residual.double(), moment.double().to(keys.device)
    adjusted = torch.linalg.solve(weight * moment + keys.T @ keys, keys.T)
    return residual.T @ adjusted.T
