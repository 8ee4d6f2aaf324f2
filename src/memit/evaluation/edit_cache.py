"""The edits of a run: each batch's deltas saved (in the run, or under ``<out>/.edit_cache``
keyed by everything the edit depends on, so that any run making the same edit reuses it),
and the size of a group's weight change."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Callable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.editing.base import Editor
from memit.evaluation.datasets import Case
from memit.evaluation.datasets.base import case_requests
from memit.evaluation.run_folders import hparams_json
from memit.requests import EditRequest
from memit.utils import distributed
from memit.utils.paths import child_path, path_component

log = logging.getLogger(__name__)

EDIT_CACHE = ".edit_cache"
# Hyperparameters added after edits were first cached, with the value that leaves an edit as
# it was: they enter the key only when changed, so a run cached earlier resumes without redoing.
HPARAMS_ADDED = {"keys_in_prompt_forms": False, "rewrite_lapsed": 0}


def batch_requests(batch: list[Case]) -> list[EditRequest]:
    """The edits of a batch; one fact asked for by several cases (MQuAKE chains share
    edits) is edited once."""
    unique: dict[tuple[str, str, str], EditRequest] = {}
    for request in (r for c in batch for r in case_requests(c)):
        unique.setdefault((request.prompt, request.subject, request.target_new), request)
    return list(unique.values())


def deltas_dir(run_dir: Path, group: list[Case]) -> Path:
    return child_path(run_dir / ".deltas", f"group_{path_component(group[0].case_id)}")


def edit_key(editor: Editor, model: PreTrainedModel, requests: list[EditRequest], earlier: list[str]) -> str:
    """What an edit depends on: method, hyperparameters, base model, options that change the
    result, the requests and the keys of the batches applied before (sequential editing)."""
    from memit.models.loading import model_fingerprint

    options = {k: v for k, v in dataclasses.asdict(editor.options).items() if k not in ("stats_dir", "stats_batch_tokens")}
    payload = {
        "alg": editor.name, "hparams": _keyed_hparams(editor), "model": model_fingerprint(model), "dtype": str(model.dtype),
        "options": options, "requests": [r.to_dict() for r in requests], "earlier": earlier,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _keyed_hparams(editor: Editor) -> dict:
    return {k: v for k, v in hparams_json(editor.hparams).items() if k not in HPARAMS_ADDED or v != HPARAMS_ADDED[k]}


def edit_or_reload(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    editor: Editor,
    folder: Path,
    batch: list[Case],
    requests: list[EditRequest],
    earlier: list[WeightDeltas],
    on_edit: Callable[[list[Case]], None] | None = None,
) -> WeightDeltas:
    """Apply ``requests`` (of the cases ``batch``) on top of the ``earlier`` batches: the
    deltas saved in ``folder`` if there are any (by an interrupted attempt of this run, or by
    any run when edits are reused), else a new edit, saved there."""
    # In a torch.distributed group every process applies the same edit; rank 0 decides and saves.
    if distributed.broadcast((folder / "edit_config.json").is_file()):
        saved = WeightDeltas.load(folder)
        if [r.get("case_id") for r in saved.manifest.get("requests", [])] == [r.case_id for r in requests]:
            log.info("Reusing the saved edit of cases %s..%s", batch[0].case_id, batch[-1].case_id)
            return saved.apply(model)
    if on_edit:
        on_edit(batch)
    deltas = editor.edit(model, tok, requests, earlier)
    if distributed.is_main():
        deltas.save(folder)
    distributed.barrier()
    return deltas


def update_size(applied: list[WeightDeltas]) -> dict[str, float]:
    """The Frobenius norm of a group's whole weight change (every batch, every changed matrix)
    and its ratio to the norm of the unedited matrices: how far a batch size pushes the model;
    with ``unwritten``, the share of its target change the last batch's solve left unwritten,
    where the method reports it (memit.editing.common.write_over_layers)."""
    total: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    for deltas in applied:
        for name, delta in deltas.deltas.items():
            # Summed in float32 only when several batches change one matrix (sequential editing).
            total[name] = total[name].float() + delta.float() if name in total else delta
            originals.setdefault(name, deltas.original_weights()[name])
    norm = math.sqrt(sum(float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2 for d in total.values()))
    weights = math.sqrt(sum(float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2 for w in originals.values()))
    size = {"norm": norm, "relative": norm / weights if weights else float("nan")}
    fit = applied[-1].manifest.get("fit", {}) if applied else {}
    return size | ({"unwritten": fit["unwritten"]} if "unwritten" in fit else {})


__all__ = ["EDIT_CACHE", "batch_requests", "deltas_dir", "edit_key", "edit_or_reload", "update_size"]
