"""Weight changes made by an edit: applied, reverted bit for bit, saved and loaded.

Saved the Hugging Face way: a folder with ``deltas.safetensors`` and ``edit_config.json``
(algorithm, hyperparameters, requests, model fingerprint, the deltas file's SHA-256), plus
``edit_state.safetensors`` when the method keeps tensors with its edit for later edits (the
edited keys). Saved deltas are checked whole before they touch a model: the checksum, the
file format, the model they were made for, every shape and dtype; nothing is applied unless
all of it can be.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from memit.errors import InputError, MissingFileError
from memit.models.loading import model_fingerprint
from memit.utils.io import atomic_path, read_json, sha256_of, write_json

log = logging.getLogger(__name__)

WEIGHTS_FILE = "deltas.safetensors"
CONFIG_FILE = "edit_config.json"
STATE_FILE = "edit_state.safetensors"
CHECKSUM_KEY = "deltas_sha256"

# The deltas applied to each model, oldest first: reverting one restores the weights it found,
# which is only right while no later deltas on the same weights are applied. Weak references,
# so that deltas the caller drops free their copies of the weights.
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, list[weakref.ref[WeightDeltas]]]" = weakref.WeakKeyDictionary()


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
        """Whether these deltas are applied to a model (and so can be reverted)."""
        return bool(self._originals)

    def apply(self, model: nn.Module, force: bool = False) -> "WeightDeltas":
        """Add the deltas to ``model``'s weights in place, keeping the originals for `revert`.

        Deltas made for another model are refused (their fingerprint is in the manifest);
        ``force`` applies them anyway, with a warning."""
        if self.applied:
            raise RuntimeError("these deltas are already applied; revert them first")
        params = self.check(model, force)
        with torch.no_grad():
            for name, delta in self.deltas.items():
                param = params[name]
                self._originals[name] = param.detach().clone()
                param.add_(delta.to(param.device, param.dtype))
        _APPLIED.setdefault(model, []).append(weakref.ref(self))
        return self

    def revert(self, model: nn.Module) -> None:
        """Restore the exact weights the model had before `apply`; deltas applied later
        to the same weights must be reverted first (newest first)."""
        if not self.applied:
            raise RuntimeError("these deltas are not applied to a model")
        stack = [d for ref in _APPLIED.get(model, []) if (d := ref()) is not None]
        later = stack[next((i for i, d in enumerate(stack) if d is self), len(stack)) + 1 :]
        if any(self._originals.keys() & d._originals.keys() for d in later):
            raise InputError("revert: deltas applied after these change the same weights; revert them first, newest first")
        params = self._parameters(model)
        with torch.no_grad():
            for name, original in self._originals.items():
                params[name].copy_(original)
        self.release()

    def release(self) -> "WeightDeltas":
        """Forget the originals kept for `revert` (the caller, e.g. an
        `memit.chain.EditChain`, reverts another way): a long sequence of applied
        edits then holds no copy of the weights per edit."""
        self._originals.clear()
        for stack in _APPLIED.values():
            stack[:] = [ref for ref in stack if (d := ref()) is not None and d is not self]
        return self

    def original_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> the weight as it was before `apply` (empty when not applied)."""
        return dict(self._originals)

    def to_peft(self, out_dir: str | Path, model: nn.Module | None = None, rank: int | None = None,
                energy: float | None = None, tok: Any = None) -> dict[str, Any]:
        """Write these deltas as a PEFT LoRA adapter (exact rank unless ``rank`` / ``energy``
        truncates it); returns the export report. See `memit.export.peft`."""
        return self.export(out_dir, "peft", model=model, tok=tok, rank=rank, energy=energy)

    def export(self, out_dir: str | Path, format: str, model: nn.Module | None = None, tok: Any = None,
               base: str | Path | None = None, rank: int | None = None, energy: float | None = None,
               edited_type: str | None = None) -> dict[str, Any]:
        """Write these deltas as ``format``: ``peft`` (a LoRA adapter), ``hf`` (the merged model
        as a Hugging Face folder; needs ``model``) or ``gguf`` (``base`` with the edited tensors
        replaced; needs ``model``). See `memit.export.export`."""
        # Imported here: the exporters' dependencies are not needed to edit.
        from memit.export import export

        return export(self, out_dir, format, model=model, tok=tok, base=base, rank=rank, energy=energy, edited_type=edited_type)

    def save(self, directory: str | Path) -> None:
        """Write ``deltas.safetensors`` (with its SHA-256 in the manifest), the preserved keys
        where there are any, and ``edit_config.json`` (requests, hyperparameters, the model's
        fingerprint) into ``directory``, each file atomically and the manifest last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = {WEIGHTS_FILE: self.deltas, **({STATE_FILE: self.state} if self.state else {})}
        for name, tensors in files.items():
            with atomic_path(directory / name) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
                if name == WEIGHTS_FILE:
                    self.manifest[CHECKSUM_KEY] = sha256_of(tmp)
        if not self.state:  # from an earlier save into this folder
            (directory / STATE_FILE).unlink(missing_ok=True)
        # Written last: a folder with a config is complete.
        write_json(directory / CONFIG_FILE, self.manifest)

    @classmethod
    def load(cls, directory: str | Path) -> "WeightDeltas":
        """Saved deltas, checked against the checksum in their manifest (when it has one)."""
        directory = Path(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise MissingFileError(f"deltas: {weights} does not exist")
        manifest = read_json(directory / CONFIG_FILE, what="edit config")
        if not isinstance(manifest, dict):
            raise InputError(f"edit config {directory / CONFIG_FILE}: expected a JSON object")
        expected = manifest.get(CHECKSUM_KEY)
        if expected is not None and sha256_of(weights) != expected:
            raise InputError(f"deltas: {weights} does not have the SHA-256 its manifest records; the file is damaged or was replaced")
        state = _read_tensors(directory / STATE_FILE) if (directory / STATE_FILE).is_file() else {}
        return cls(_read_tensors(weights), manifest, state)

    def check(self, model: nn.Module, force: bool = False) -> dict[str, nn.Parameter]:
        """Refuse (with an `InputError`) deltas that cannot all be applied to ``model``:
        a parameter it lacks, another shape or a non-float dtype, or another model's fingerprint
        unless ``force``. Returns the model's parameters by name."""
        params = self._parameters(model)
        expected = self.manifest.get("model_fingerprint")
        if not expected or expected == model_fingerprint(model):
            return params
        if not force:
            raise InputError(
                f"deltas: made for model {expected}, not this one ({model_fingerprint(model)}); "
                "applying them would corrupt it (force=True / --force applies them anyway)"
            )
        log.warning("Applying deltas made for model %s to a different model, as forced", expected)
        return params

    def _parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        for name, delta in self.deltas.items():
            if name not in params:
                raise InputError(f"deltas: the model has no parameter {name!r}")
            if params[name].shape != delta.shape:
                raise InputError(f"deltas: {name} has shape {tuple(params[name].shape)}, delta {tuple(delta.shape)}")
            if not delta.is_floating_point():
                raise InputError(f"deltas: the delta of {name} has dtype {delta.dtype}, not a floating-point type")
            if params[name].device.type == "meta":
                raise InputError(f"deltas: {name} is offloaded by the device map; load the model with that layer on a device")
        return params


def summed_deltas(edits: Iterable[WeightDeltas]) -> dict[str, torch.Tensor]:
    """Each weight's total change over ``edits`` (read once, one at a time), summed in float64
    so that their order does not round the total, in the deltas' own dtype."""
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for edit in edits:
        for name, delta in edit.deltas.items():
            total[name] = total[name] + delta.double() if name in total else delta.double()
            dtypes[name] = delta.dtype
    return {name: delta.to(dtypes[name]) for name, delta in total.items()}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise InputError(f"deltas: {path} is not a readable safetensors file ({err})") from None
