"""Deltas written into a GGUF file: a copy of the base file with the edited tensors replaced.

A replaced tensor keeps its type (F32/F16/BF16 written exactly, quantised types quantised again
with the ``gguf`` package) and therefore its size, so the copy is patched in place: every other
tensor, all metadata and the file's layout stay byte for byte as in the base. Everything is
computed and checked before the output folder is written.

An edit can be smaller than a quantised type's rounding step: MEMIT's change to a down
projection of the default model is ~2 % of the weight, Q4_1's rounding error ~8 %, and
re-quantising to Q4_1 rounds the edit away. Such a loss (or a type the ``gguf`` package cannot
quantise) is an error unless ``edited_type`` names a type for the edited tensors (``f16``,
``bf16``, ``f32``, ``q8_0``); their size then changes, so the data section is laid out anew:
the metadata stays byte for byte, each tensor's bytes too, and only the edited tensors'
type and the data offsets in the tensor table change.

GGUF tensor names come from the ``gguf`` package's map of Hugging Face names
(``model.layers.4.mlp.down_proj.weight`` -> ``blk.4.ffn_down.weight`` for Llama).
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from memit.errors import InputError, MissingFileError
from memit.export.common import unedited
from memit.utils.io import atomic_dir, write_json

log = logging.getLogger(__name__)

REPORT_FILE = "export_report.json"
# A base tensor further than this (relative Frobenius) from the model's weight is another
# model's: 4-bit quantisation moves a weight by ~10 %, an unrelated weight differs by ~140 %.
BASE_MISMATCH = 0.3
# Re-quantising may lose at most this share of the edit (||error||_F / ||Δ||_F) before the
# export is refused; past it the file would not hold the edit.
LOST_EDIT = 0.5
EDITED_TYPES = ("f32", "f16", "bf16", "q8_0")
# transformers' model_type for a GGUF architecture, where the names differ.
MODEL_TYPES = {"llama": ("llama", "mistral")}


@dataclass
class TensorPatch:
    """New bytes for one tensor of the base file."""

    gguf_name: str
    hf_name: str
    type: str
    # The base's type of the tensor, when it was written in another (edited_type).
    base_type: str
    data: bytes
    # ||written - (base + Δ)||_F / ||Δ||_F: the share of the edit lost to quantisation.
    error_of_delta: float
    # ||written - (base + Δ)||_F / ||base + Δ||_F.
    error_of_weight: float
    # ||base - model weight||_F / ||model weight||_F: how far the model is from this base.
    base_difference: float


def export_gguf(
    deltas: Any, out_dir: str | Path, model: PreTrainedModel, base: str | Path, edited_type: str | None = None
) -> dict[str, Any]:
    """Copy ``base`` into ``out_dir`` (same file name) with ``deltas`` added to its tensors;
    returns the report, also written as ``export_report.json`` beside the file.
    ``edited_type``: write the edited tensors in this type instead of the base's."""
    import gguf

    if edited_type is not None and edited_type.lower() not in EDITED_TYPES:
        raise InputError(f"edited_type: {edited_type!r} is not one of {', '.join(EDITED_TYPES)}")
    override = None if edited_type is None else gguf.GGMLQuantizationType[edited_type.upper()]
    base = Path(base)
    if not base.is_file():
        raise MissingFileError(f"base: {base} does not exist")
    reader = _read(base)
    with unedited(deltas, model):
        deltas.check(model)
        arch, name_map = _architecture(reader, model, base)
        tensors = {t.name: t for t in reader.tensors}
        patches = [
            _patch(gguf, name, delta, model, tensors, name_map, arch, base, override) for name, delta in deltas.deltas.items()
        ]
    with atomic_dir(out_dir) as folder:
        target = folder / base.name
        _write(reader, base, target, {p.gguf_name: p for p in patches})
        report = {
            "format": "gguf",
            "base": str(base),
            "file": base.name,
            "architecture": arch,
            "edited_type": edited_type,
            "tensors": {p.gguf_name: {k: v for k, v in asdict(p).items() if k not in ("data", "gguf_name")} for p in patches},
            "max_error_of_delta": max(p.error_of_delta for p in patches),
        }
        write_json(folder / REPORT_FILE, report)
    for p in patches:
        log.info("%s (%s): quantisation error %.3g of the edit, %.3g of the weight", p.gguf_name, p.type, p.error_of_delta, p.error_of_weight)
    return report


def _read(path: Path) -> Any:
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (ValueError, OSError) as err:
        raise InputError(f"base: {path} is not a readable GGUF file ({err})") from None


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _architecture(reader: Any, model: PreTrainedModel, base: Path) -> tuple[str, Any]:
    """The base file's architecture (which must be the model's) and its tensor name map."""
    import gguf

    arch = _field(reader, gguf.Keys.General.ARCHITECTURE)
    model_type = getattr(model.config, "model_type", "")
    if arch is None or model_type not in MODEL_TYPES.get(arch, (arch,)):
        raise InputError(f"base: {base} holds a {arch or 'unnamed'} model, not the edited model's architecture ({model_type})")
    by_name = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise InputError(f"base: the gguf package does not know the architecture {arch!r} of {base}")
    blocks = _field(reader, f"{arch}.block_count")
    return arch, gguf.get_tensor_name_map(by_name[arch], int(blocks or 0))


def _patch(
    gguf: Any, name: str, delta: torch.Tensor, model: PreTrainedModel, tensors: dict, name_map: Any, arch: str, base: Path, override: Any
) -> TensorPatch:
    """The new bytes of ``name``'s tensor, after checking that the base holds the model's weight."""
    gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise InputError(f"gguf: no GGUF tensor name for {name} in a {arch} file")
    if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
        # llama.cpp stores Llama's query and key rows permuted for its RoPE layout.
        raise InputError(f"gguf: {name} is stored permuted in Llama GGUF files ({gguf_name}); exporting its edit is not supported")
    tensor = tensors.get(gguf_name)
    if tensor is None:
        raise InputError(f"base: {base} has no tensor {gguf_name} (for {name}); it is not the edited model's base")
    weight = model.get_parameter(name).detach()
    # GGUF stores every matrix as out x in; GPT-2's Conv1D keeps in x out.
    transposed = isinstance(model.get_submodule(name.rpartition(".")[0]), Conv1D)
    weight = (weight.T if transposed else weight).to("cpu", torch.float64).numpy()
    change = (delta.T if transposed else delta).to("cpu", torch.float64).numpy()
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if shape != change.shape:
        raise InputError(f"base: tensor {gguf_name} of {base} has shape {shape}, the edited {name} {change.shape}; it is not the edited model's base")
    base_type = tensor.tensor_type
    if override is None:
        _check_writable(gguf, gguf_name, base_type)
    current = gguf.quants.dequantize(tensor.data, base_type).astype(np.float64).reshape(shape)
    difference = _relative(current - weight, weight)
    if difference > BASE_MISMATCH:
        raise InputError(
            f"base: tensor {gguf_name} of {base} differs from the model's {name} by {difference:.0%}; it is not the edited model's base"
        )
    edited = current + change
    qtype = base_type if override is None else override
    data = np.ascontiguousarray(gguf.quants.quantize(edited.astype(np.float32), qtype))
    written = gguf.quants.dequantize(data, qtype).astype(np.float64).reshape(shape)
    lost = _relative(written - edited, change)
    if override is None and lost > LOST_EDIT:
        raise InputError(
            f"gguf: re-quantising {gguf_name} as {qtype.name} loses {lost:.0%} of the edit (the change is smaller than "
            f"{qtype.name}'s rounding step); write the edited tensors as a finer type (edited_type / --edited-type: {', '.join(EDITED_TYPES)})"
        )
    return TensorPatch(gguf_name, name, qtype.name, base_type.name, data.tobytes(), lost, _relative(written - edited, edited), difference)


def _check_writable(gguf: Any, gguf_name: str, qtype: Any) -> None:
    """Refuse, before any work, a tensor type the ``gguf`` package cannot quantise (K-quants
    and i-quants in gguf 0.19)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, block), dtype=np.float32), qtype)
    except NotImplementedError:
        raise InputError(
            f"gguf: tensor {gguf_name} is {qtype.name}, a type the installed gguf package cannot quantise; "
            f"write the edited tensors as another type (edited_type / --edited-type: {', '.join(EDITED_TYPES)})"
        ) from None


def _write(reader: Any, base: Path, target: Path, patches: dict[str, TensorPatch]) -> None:
    """``base`` with the patched tensors' bytes: in place when every patch has its tensor's
    type and size, else with the data section laid out anew (see the module's docstring)."""
    tensors = {t.name: t for t in reader.tensors}
    if all(p.type == tensors[name].tensor_type.name and len(p.data) == int(tensors[name].n_bytes) for name, p in patches.items()):
        shutil.copyfile(base, target)
        with open(target, "r+b") as handle:
            for name, patch in patches.items():
                handle.seek(int(tensors[name].data_offset))
                handle.write(patch.data)
        return
    from gguf import GGMLQuantizationType

    start = int(reader.data_offset)
    # New data offsets (relative to the data section), in the base's order of tensor data.
    offsets, cursor = {}, 0
    for tensor in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        cursor = -(-cursor // reader.alignment) * reader.alignment
        offsets[tensor.name] = cursor
        cursor += len(patches[tensor.name].data) if tensor.name in patches else int(tensor.n_bytes)
    with open(base, "rb") as source, open(target, "wb") as out:
        out.write(source.read(start))  # header, metadata and tensor table as they are; the table is patched below
        for tensor in reader.tensors:
            # A tensor table entry: name length, name, n_dims, dims, type (uint32), offset (uint64).
            parts = tensor.field.parts
            entry_end = tensor.field.offset + sum(part.nbytes for part in parts)
            if tensor.name in patches:
                out.seek(entry_end - parts[-1].nbytes - parts[-2].nbytes)
                out.write(np.array([GGMLQuantizationType[patches[tensor.name].type]], dtype=parts[-2].dtype).tobytes())
            out.seek(entry_end - parts[-1].nbytes)
            out.write(np.array([offsets[tensor.name]], dtype=parts[-1].dtype).tobytes())
        for tensor in sorted(reader.tensors, key=lambda t: offsets[t.name]):
            out.seek(start + offsets[tensor.name])
            if tensor.name in patches:
                out.write(patches[tensor.name].data)
            else:
                source.seek(int(tensor.data_offset))
                out.write(source.read(int(tensor.n_bytes)))


def _relative(error: np.ndarray, reference: np.ndarray) -> float:
    norm = float(np.linalg.norm(reference))
    return float(np.linalg.norm(error)) / norm if norm else float(np.linalg.norm(error))
