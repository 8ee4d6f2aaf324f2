"""The Python API: edit a model, or apply MEMIT the way the paper's code does."""
from __future__ import annotations

import copy as copy_module
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.editing.base import EditOptions
from memit.editing.hparams import HyperParams
from memit.editing.methods import get_editor_class, resolve_hparams
from memit.requests import EditRequest

Requests = Iterable[Mapping[str, Any] | EditRequest]


def edit_model(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Requests,
    hparams: HyperParams | str | Path | Mapping | None = None,
    algorithm: str = "MEMIT",
    options: EditOptions | None = None,
    earlier: Sequence[WeightDeltas] = (),
    **option_overrides: Any,
) -> WeightDeltas:
    """Edit ``model`` in place and return the applied `WeightDeltas` (``.revert(model)``
    undoes the edit exactly; ``.save(dir)`` keeps it). ``hparams`` is an object, a dict, a
    JSON file, a preset name, or None for the preset of the model's name. ``earlier``: the
    edits already applied to ``model``, oldest first, which AlphaEdit preserves."""
    editor_cls = get_editor_class(algorithm)
    options = options or EditOptions(**option_overrides)
    editor = editor_cls(resolve_hparams(algorithm, hparams, model), options)
    return editor.edit(model, tok, requests, earlier)


def apply_memit_to_model(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    requests: Requests,
    hparams: HyperParams | str | Path | Mapping | None = None,
    copy: bool = False,
    return_orig_weights: bool = False,
    **option_overrides: Any,
) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """The paper's entry point: returns ``(edited model, original weights)``; the original
    weights are filled only with ``return_orig_weights``. With ``copy`` the input model
    is left untouched."""
    if copy:
        model = copy_module.deepcopy(model)
    deltas = edit_model(model, tok, requests, hparams, "MEMIT", **option_overrides)
    return model, deltas.original_weights() if return_orig_weights else {}
