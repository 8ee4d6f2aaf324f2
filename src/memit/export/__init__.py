"""Edits where models are served: saved deltas as a PEFT LoRA adapter, a merged Hugging Face
folder, or the base GGUF file with the edited tensors replaced.

Every memit edit is an additive change of some weight matrices, so one set of exporters serves
every method. Each writes its output folder atomically: an export that fails (bad input, a
type that cannot be written) leaves no partial folder behind.

This package does not import `memit.deltas` (which calls into it); it takes any object
with the `WeightDeltas` interface. `memit.chain.load_edits` reads a
saved deltas folder or an edit chain into one.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from memit.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMATS = ("peft", "hf", "gguf")
REPORT_FILE = "export_report.json"


def export(
    deltas: Any,
    out_dir: str | Path,
    format: str,
    model: "PreTrainedModel | None" = None,
    tok: "PreTrainedTokenizerBase | None" = None,
    base: str | Path | None = None,
    rank: int | None = None,
    energy: float | None = None,
    edited_type: str | None = None,
) -> dict[str, Any]:
    """Write ``deltas`` (a `WeightDeltas`) to ``out_dir`` in ``format`` (``peft``, ``hf`` or ``gguf``) and return
    the export report (also written as ``export_report.json`` for peft and gguf).

    ``model``: the model the deltas were made for, unedited or with these deltas applied (as
    `memit.edit_model` returns them; left so). Needed for ``hf`` and ``gguf``;
    for ``peft`` it adds the fingerprint check, the module types and, when truncating, the
    efficacy check, which also needs ``tok``). ``base``: the GGUF file to patch (``gguf``).
    ``rank`` / ``energy``: truncate the LoRA factors (``peft`` only). ``edited_type``: write
    the edited GGUF tensors in this type (``f16``, ``bf16``, ``f32``, ``q8_0``) instead of the
    base's, for a quantised type that would round the edit away or cannot be written."""
    if format not in FORMATS:
        raise InputError(f"format: unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format != "peft" and (rank is not None or energy is not None):
        raise InputError(f"rank/energy: truncation applies to the peft export, not {format}")
    if format != "gguf" and (base is not None or edited_type is not None):
        raise InputError(f"base/edited_type: a base GGUF file and its tensor type are for the gguf export, not {format}")
    if format == "peft":
        from memit.export.peft import export_peft

        return export_peft(deltas, out_dir, model=model, tok=tok, rank=rank, energy=energy)
    if model is None:
        raise InputError(f"model: the {format} export needs the model the deltas were made for")
    if format == "hf":
        from memit.export.hf import export_hf

        return export_hf(deltas, out_dir, model, tok)
    if base is None:
        raise InputError("base: the gguf export needs the base GGUF file (--base FILE.gguf)")
    from memit.export.gguf import export_gguf

    return export_gguf(deltas, out_dir, model, base, edited_type)
