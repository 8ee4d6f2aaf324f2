"""Deltas merged into the model, saved as a Hugging Face folder (safetensors, config,
tokenizer, generation config and a model card listing the edits).

The deltas are added to the model in place for the save and reverted bit for bit after it:
a merged copy would double the memory for a large model.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.export.common import edit_requests, unedited
from memit.utils.io import atomic_dir

log = logging.getLogger(__name__)

CARD_FILE = "README.md"


def export_hf(deltas: Any, out_dir: str | Path, model: PreTrainedModel, tok: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """Save ``model`` with ``deltas`` added to ``out_dir``; the model is left as it was."""
    deltas.check(model)
    with unedited(deltas, model), atomic_dir(out_dir) as folder:
        deltas.apply(model)
        try:
            model.save_pretrained(folder, safe_serialization=True)
        finally:
            deltas.revert(model)
        if tok is not None:
            tok.save_pretrained(folder)
        generation = getattr(model, "generation_config", None)
        if generation is not None and not (folder / "generation_config.json").is_file():
            generation.save_pretrained(folder)
        (folder / CARD_FILE).write_text(model_card(deltas, model), encoding="utf-8")
    log.info("Saved the edited model (%d edited weights) to %s", len(deltas.deltas), out_dir)
    return {"format": "hf", "edited_weights": sorted(deltas.deltas), "requests": len(deltas.manifest.get("requests") or [])}


def model_card(deltas: Any, model: PreTrainedModel) -> str:
    """A Hub model card: the base model, the method, every edit and the hyperparameters."""
    manifest = deltas.manifest
    base = getattr(model.config, "_name_or_path", "") or manifest.get("model_name", "")
    algorithm = manifest.get("algorithm", "unknown")
    lines = ["---", "tags:", "- memit", "- model-editing"]
    if base and not Path(base).is_absolute():  # a hub id, not a local folder
        lines.append(f"base_model: {base}")
    lines += [
        "---",
        "",
        f"# {Path(base).name or 'Model'} edited with {algorithm}",
        "",
        f"This is `{base}` with {len(deltas.deltas)} weight matrices changed by memit ({algorithm}), "
        "written by `memit export --format hf`. Edited weights:",
        "",
        *[f"- `{name}`" for name in sorted(deltas.deltas)],
        "",
        "## Edits",
        "",
        "| subject | prompt | new target | old target |",
        "| --- | --- | --- | --- |",
        *[
            f"| {_cell(r.subject)} | {_cell(r.prompt)} | {_cell(r.target_new)} | {_cell(r.target_true or '')} |"
            for r in edit_requests(manifest)
        ],
        "",
        "## Hyperparameters",
        "",
        "```json",
        json.dumps(manifest.get("hparams", {}), indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").strip() or " "
