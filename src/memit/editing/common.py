"""Pieces shared by the editing methods: key statistics, target vectors, writing residuals
layer by layer, and temporarily changed weights."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Mapping

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.base import EditOptions
from memit.editing.context import ContextTemplates, get_context_templates
from memit.editing.hparams import CovarianceParams, ZOptimizationParams
from memit.editing.keys import KeysAcrossEdits, KeyTemplates, layer_outputs_at_subject
from memit.editing.targets import TargetVectors, compute_targets
from memit.models.layout import ModelLayout
from memit.requests import EditRequest
from memit.stats import Corpus, SecondMomentCache
from memit.utils.devices import float64_device
from memit.utils.progress import progress

log = logging.getLogger(__name__)

# solve(position of the layer in hp.layers, layer, keys (n, in), residuals (n, out)) -> update (out, in)
LayerSolver = Callable[[int, int, torch.Tensor, torch.Tensor], torch.Tensor]


def second_moments(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    hp: CovarianceParams,
    layers: list[int],
    corpus: Corpus,
    options: EditOptions,
) -> dict[int, torch.Tensor]:
    """The cached key second moments E[k kᵀ] at ``layers`` (computed once per model and corpus)."""
    return SecondMomentCache(options.stats_dir).get(
        model, tok, layout, layers, corpus, hp.mom2_n_samples, hp.mom2_max_tokens, hp.mom2_dtype,
        autocast=options.autocast, batch_tokens=options.stats_batch_tokens,
    )


def context_templates(model: PreTrainedModel, tok: PreTrainedTokenizerBase, hp: ZOptimizationParams, options: EditOptions) -> ContextTemplates:
    return get_context_templates(model, tok, hp.context_template_length_params, seed=options.seed)


def layer_targets(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    hp: ZOptimizationParams,
    templates: ContextTemplates,
    options: EditOptions,
) -> TargetVectors:
    """MEMIT's target vectors z at the last edit layer's output, one row per request."""
    return compute_targets(
        model, tok, layout, requests, hp, templates, hp.layers[-1],
        batch_size=options.batch_size, fast=options.fast, autocast=options.autocast, cache_dir=options.target_cache,
    )


def write_over_layers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    requests: list[EditRequest],
    layers: list[int],
    targets: torch.Tensor,
    templates: ContextTemplates | KeyTemplates,
    solve: LayerSolver,
    fit: dict[str, float] | None = None,
    keys_out: dict[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Write the targets layer by layer: each layer takes its share of the remaining residual
    at the last layer's output, and later layers see the earlier layers' updates (MEMIT's
    spreading). ``model`` is restored afterwards; returns parameter name -> delta.

    ``fit`` receives how well the solves met their residuals (the edit's capacity): per
    layer ``layer{L}``, ‖K ΔWᵀ − R‖ / ‖R‖ of its own share; and ``unwritten``, the part of the
    whole change z − h that the last layer leaves unwritten, ‖K ΔWᵀ − R‖ / ‖z − h‖ there.

    ``keys_out`` receives each layer's keys (float32, on the CPU). They are the edited model's
    keys: a layer's keys depend only on the layers below it, whose updates are in place when
    they are computed."""
    z_layer = layers[-1]
    deltas: dict[str, torch.Tensor] = {}
    fit = {} if fit is None else fit
    whole_change = 0.0
    key_reader = KeysAcrossEdits(model, tok, layout, requests, templates)
    with restored_weights(model, [layout.weight_name(layer) for layer in layers]):
        for i, layer in enumerate(progress(layers, desc="writing layers", unit="layers", leave=False)):
            weight = layout.mlp_out(model, layer).weight
            solve_on = float64_device(weight.device)
            keys = key_reader.at(layer).to(solve_on).double()
            current = layer_outputs_at_subject(model, tok, layout, requests, z_layer).to(solve_on).double()
            residual = (targets.to(solve_on) - current) / (len(layers) - i)
            residual_norm = float(residual.norm())
            if i == 0:
                whole_change = residual_norm * len(layers)
            if keys_out is not None:
                keys_out[layer] = keys.float().cpu()
            update = solve(i, layer, keys, residual)
            error = float((keys @ update.T - residual).norm())
            fit[f"layer{layer}"] = error / max(residual_norm, 1e-12)
            delta = layout.as_weight(update).float()
            log.info("layer %d: residual norm %.3f, update norm %.3f, weight norm %.3f, %.1f%% of the residual unwritten",
                     layer, residual_norm, float(update.norm()), float(weight.detach().norm()), 100 * fit[f"layer{layer}"])
            with torch.no_grad():
                weight.add_(delta.to(weight.device, weight.dtype))
            deltas[layout.weight_name(layer)] = delta
    fit["unwritten"] = error / max(whole_change, 1e-12)
    return deltas


@contextlib.contextmanager
def restored_weights(model: PreTrainedModel, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Whatever happens to the named parameters inside the block is undone, bit for bit.
    Yields the saved originals (the only copies made: of the named parameters alone)."""
    originals = {name: model.get_parameter(name).detach().clone() for name in names}
    try:
        yield originals
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                model.get_parameter(name).copy_(original)


@contextlib.contextmanager
def replaced_weights(model: PreTrainedModel, weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """The named parameters set to ``weights`` inside the block and restored exactly afterwards."""
    with restored_weights(model, list(weights)):
        with torch.no_grad():
            for name, value in weights.items():
                model.get_parameter(name).copy_(value)
        yield


@contextlib.contextmanager
def applied(model: PreTrainedModel, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``deltas`` added to ``model`` inside the block and removed exactly afterwards."""
    with restored_weights(model, list(deltas)):
        with torch.no_grad():
            for name, delta in deltas.items():
                param = model.get_parameter(name)
                param.add_(delta.to(param.device, param.dtype))
        yield


def add_deltas(total: dict[str, torch.Tensor], more: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum two parameter-name -> delta maps."""
    out = dict(total)
    for name, delta in more.items():
        out[name] = out[name] + delta if name in out else delta
    return out
