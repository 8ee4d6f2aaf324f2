"""The interface every editing method implements, and the method registry."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.editing.hparams import HyperParams, HyperParamsError, preset_name_for
from memit.models.layout import ModelLayout
from memit.models.loading import model_fingerprint
from memit.requests import EditRequest, check_tokenization, parse_requests


@dataclass
class EditOptions:
    """How to run an edit; none of these change what the edit should compute."""

    # A corpus file or dataset name for key statistics; overrides the preset's mom2_dataset.
    corpus: str | None = field(default_factory=lambda: os.environ.get("MEMIT_CORPUS"))
    stats_dir: str | None = None
    # Requests whose target vectors are optimised together.
    batch_size: int = 16
    # False runs the reference computation: the whole model at every optimisation step.
    fast: bool = True
    # bfloat16 autocast for forward passes (statistics and solves stay in float32/float64).
    autocast: bool = False
    seed: int = 0


@dataclass
class EditTask:
    """One edit's inputs: the model with its tokenizer and layout, the requests, and the edits
    already applied to the model (oldest first), for methods that protect them."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    layout: ModelLayout
    requests: list[EditRequest]
    earlier: Sequence[WeightDeltas] = ()


class Editor(ABC):
    """An editing method: computes weight deltas for a batch of requests."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[HyperParams]]

    def __init__(self, hparams: HyperParams, options: EditOptions | None = None):
        if not isinstance(hparams, self.hparams_class):
            raise HyperParamsError(f"hparams: {self.name} needs {self.hparams_class.__name__}, got {type(hparams).__name__}")
        self.hparams = hparams
        self.options = options or EditOptions()

    @abstractmethod
    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        """Parameter name -> additive change; ``task.model`` is left as it was."""

    def edit_state(self, task: EditTask) -> dict[str, torch.Tensor]:
        """Tensors that later edits need from this one, computed on the edited model (kept
        in :attr:`WeightDeltas.state`); none by default."""
        return {}

    def layout(self, model: PreTrainedModel) -> ModelLayout:
        hp = self.hparams
        layout = ModelLayout.from_model(model, getattr(hp, "layer_module_tmp", None), getattr(hp, "rewrite_module_tmp", None))
        layout.check_layers(getattr(hp, "layers", []))
        return layout

    def edit(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Iterable[Mapping[str, Any] | EditRequest],
        earlier: Sequence[WeightDeltas] = (),
    ) -> WeightDeltas:
        """Validate ``requests``, compute the deltas, apply them to ``model`` and return them.

        ``earlier``: edits already applied to ``model`` (oldest first) that this one should
        preserve; AlphaEdit keeps its update away from their keys, other methods ignore them.
        """
        requests = parse_requests(requests)
        check_tokenization(requests, tok)
        layout = self.layout(model)
        torch.manual_seed(self.options.seed)
        task = EditTask(model, tok, layout, requests, earlier)
        deltas = self.compute_deltas(task)
        manifest = {
            "algorithm": self.name,
            "hparams": self.hparams.to_dict(),
            "requests": [r.to_dict() for r in requests],
            "model_fingerprint": model_fingerprint(model),
            "model_name": getattr(model.config, "_name_or_path", ""),
        }
        edit = WeightDeltas(deltas, manifest).apply(model)
        try:
            edit.state = self.edit_state(task)
        except BaseException:
            edit.revert(model)  # no half-finished edit left on the model
            raise
        return edit


EDITORS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    EDITORS[cls.name] = cls
    return cls


def get_editor_class(name: str) -> type[Editor]:
    import memit.editing.methods  # noqa: F401  (registers the methods)

    if name not in EDITORS:
        raise ValueError(f"alg: unknown editing method {name!r}; choose one of {sorted(EDITORS)}")
    return EDITORS[name]


def resolve_hparams(algorithm: str, hparams: HyperParams | str | Path | Mapping | None, model: PreTrainedModel) -> HyperParams:
    """A hyperparameter object from an object, a dict, a JSON file, a preset name, or the
    preset matching the model's name when None."""
    cls = get_editor_class(algorithm).hparams_class
    if isinstance(hparams, HyperParams):
        return hparams
    if isinstance(hparams, Mapping):
        return cls.from_dict(hparams)
    if hparams is not None and Path(hparams).is_file():
        return cls.from_json(hparams)
    name = str(hparams) if hparams is not None else preset_name_for(getattr(model.config, "_name_or_path", ""))
    return cls.preset(name)
