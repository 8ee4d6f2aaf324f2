"""The fine-tuning gradient of an edit, as MEND reads it: for each edited weight, the rank-one
factors (key u, output gradient δ) of every token the edit loss depends on."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from memit.editing.mend.network import Factors
from memit.editing.prompts import TargetBatch
from memit.models.layout import ModelLayout
from memit.utils.grad import trainable_only


def gradient_factors(model: PreTrainedModel, layout: ModelLayout, layers: list[int], batch: TargetBatch) -> Factors:
    """Keys and output gradients of the summed target NLL (so that each request's gradient
    does not depend on how many are edited together) at the MLP output projections of
    ``layers``, one row per prompt or target token before the last target token."""
    modules = {layout.weight_name(layer): layout.mlp_out(model, layer) for layer in layers}
    keys: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def start_graph(module: nn.Module, args: tuple) -> tuple:
        # Differentiate from the first edited weight up only; the layers below need no graph.
        return (args[0].detach().requires_grad_(True), *args[1:])

    def capture(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            keys[name], outputs[name] = args[0], output

        return hook

    handles = [modules[layout.weight_name(layers[0])].register_forward_pre_hook(start_graph)]
    handles += [module.register_forward_hook(capture(name)) for name, module in modules.items()]
    try:
        with trainable_only(model), torch.enable_grad():
            logits = model(**batch.inputs).logits
            loss = batch.nll(logits) * batch.n_sequences
            grads = torch.autograd.grad(loss, [outputs[name] for name in modules])
    finally:
        for handle in handles:
            handle.remove()
    used = _loss_tokens(batch)
    return {name: (keys[name].detach()[used.to(grad.device)], grad[used.to(grad.device)]) for name, grad in zip(modules, grads)}


def _loss_tokens(batch: TargetBatch) -> torch.Tensor:
    """(sequences, positions) mask of the tokens up to each sequence's last predicting position."""
    width = batch.inputs["input_ids"].shape[1]
    last = torch.full((batch.n_sequences,), -1, dtype=torch.long, device=batch.positions.device)
    last = last.scatter_reduce(0, batch.rows, batch.positions, reduce="amax")
    return torch.arange(width, device=last.device).unsqueeze(0) <= last.unsqueeze(1)
