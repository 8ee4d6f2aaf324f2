"""Weight changes made by an edit: applied, reverted bit for bit, saved and loaded.

Saved the Hugging Face way: a folder with ``deltas.safetensors`` and ``edit_config.json``
(algorithm, hyperparameters, requests, model fingerprint), plus ``edit_state.safetensors``
when the method keeps tensors with its edit for later edits (AlphaEdit: the edited keys).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memit.errors import InputError, MissingFileError
from memit.models.loading import model_fingerprint
from memit.utils.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

WEIGHTS_FILE = "deltas.safetensors"
CONFIG_FILE = "edit_config.json"
STATE_FILE = "edit_state.safetensors"


@dataclass
class WeightDeltas:
    """``deltas`` maps parameter names to additive changes in the parameter's own shape;
    ``state`` holds what the method needs to know of this edit when editing on top of it."""

    deltas: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # Seconds per phase of the edit that made these deltas (not saved).
    timings: dict[str, float] = field(default_factory=dict, repr=False)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def applied(self) -> bool:
        return bool(self._originals)

    def apply(self, model: nn.Module) -> "WeightDeltas":
        """Add the deltas to ``model``'s weights in place, keeping the originals for :meth:`revert`."""
        if self.applied:
            raise RuntimeError("these deltas are already applied; revert them first")
        params = self._parameters(model)
        expected = self.manifest.get("model_fingerprint")
        if expected and expected != model_fingerprint(model):
            log.warning("Applying deltas made for model %s to a different model", expected)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                param = params[name]
                self._originals[name] = param.detach().clone()
                param.add_(delta.to(param.device, param.dtype))
        return self

    def revert(self, model: nn.Module) -> None:
        """Restore the exact weights the model had before :meth:`apply`."""
        if not self.applied:
            raise RuntimeError("these deltas are not applied to a model")
        params = self._parameters(model)
        with torch.no_grad():
            for name, original in self._originals.items():
                params[name].copy_(original)
        self._originals.clear()

    def release(self) -> "WeightDeltas":
        """Forget the originals kept for :meth:`revert` (the caller, e.g. an
        :class:`memit.chain.EditChain`, reverts another way): a long sequence of applied
        edits then holds no copy of the weights per edit."""
        self._originals.clear()
        return self

    def original_weights(self) -> dict[str, torch.Tensor]:
        return dict(self._originals)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {WEIGHTS_FILE: self.deltas, **({STATE_FILE: self.state} if self.state else {})}
        for name, tensors in files.items():
            with atomic_path(directory / name) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        if not self.state:  # from an earlier save into this folder
            (directory / STATE_FILE).unlink(missing_ok=True)
        # Written last: a folder with a config is complete.
        write_json(directory / CONFIG_FILE, self.manifest)

    @classmethod
    def load(cls, directory: str | Path) -> "WeightDeltas":
        directory = Path(directory)
        if not (directory / WEIGHTS_FILE).is_file():
            raise MissingFileError(f"deltas: {directory / WEIGHTS_FILE} does not exist")
        manifest = read_json(directory / CONFIG_FILE, what="edit config")
        state = load_file(str(directory / STATE_FILE)) if (directory / STATE_FILE).is_file() else {}
        return cls(load_file(str(directory / WEIGHTS_FILE)), manifest, state)

    def _parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        for name, delta in self.deltas.items():
            if name not in params:
                raise InputError(f"deltas: the model has no parameter {name!r}")
            if params[name].shape != delta.shape:
                raise InputError(f"deltas: {name} has shape {tuple(params[name].shape)}, delta {tuple(delta.shape)}")
            if params[name].device.type == "meta":
                raise InputError(f"deltas: {name} is offloaded by the device map; load the model with that layer on a device")
        return params
