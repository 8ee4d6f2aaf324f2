"""What ``memit tune`` needs before the search: the starting preset, the tuning requests, and
the traced MLP effect per layer."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.hparams import HyperParamsError, list_presets, preset_name_for
from memit.editing.memit.hparams import MEMITHyperParams
from memit.errors import InputError
from memit.evaluation.datasets import CounterFactCase, data_dir, load_cases
from memit.evaluation.datasets.base import case_requests
from memit.evaluation.runner import editable_cases
from memit.models.loading import DEFAULT_MODEL_NAME
from memit.tracing import TraceConfig, load_knowns, summarize_traces, trace_dataset
from memit.tracing.run import AVERAGE_FILE
from memit.utils.io import read_json

log = logging.getLogger(__name__)

TUNING_FILE = "counterfact_mend/counterfact-train.json"


def starting_hparams(model_name: str, hparams: str | None) -> MEMITHyperParams:
    """``hparams`` (a file or preset name), else the model's MEMIT preset, else the default
    model's (whose layers, λ, learning rate, steps and statistics size the search replaces)."""
    if hparams is not None:
        if Path(hparams).is_file():
            return MEMITHyperParams.from_json(hparams)
        return MEMITHyperParams.preset(hparams)
    name = preset_name_for(model_name)
    if name in list_presets("MEMIT"):
        return MEMITHyperParams.preset(name)
    log.info("No MEMIT preset for %s: starting from %s's", model_name, DEFAULT_MODEL_NAME)
    return MEMITHyperParams.preset(DEFAULT_MODEL_NAME)


def load_tuning_cases(
    tok: PreTrainedTokenizerBase,
    data_file: str | Path | None,
    folder: str | Path | None,
    exclude_files: Sequence[str | Path],
    count: int,
    seed: int = 0,
) -> tuple[list[CounterFactCase], Path]:
    """``count`` CounterFact cases drawn (seeded) from ``data_file`` (MEND's training split by
    default), none sharing a case id or subject with a case of ``exclude_files``."""
    path = Path(data_file) if data_file else data_dir(folder) / TUNING_FILE
    if not path.is_file():
        raise InputError(f"data_file: {path} does not exist; pass --data-file (CounterFact requests not used for evaluation)")
    _, path, cases = load_cases(None, path)
    if not all(isinstance(c, CounterFactCase) for c in cases):
        raise InputError(f"data_file: {path} is not a CounterFact file; tuning scores efficacy, paraphrase and neighborhood")
    ids: set = set()
    subjects: set[str] = set()
    for exclude in exclude_files:
        for case in load_cases(None, exclude)[2]:
            ids.add(case.case_id)
            subjects.update(r.subject for r in case_requests(case))
    kept = [c for c in cases if c.case_id not in ids and c.request.subject not in subjects]
    log.info("Tuning cases: %d of %d left after excluding %d evaluation case ids and %d subjects", len(kept), len(cases), len(ids), len(subjects))
    random.Random(seed).shuffle(kept)
    chosen, _ = editable_cases(kept, tok, count)
    if len(chosen) < count:
        raise InputError(f"edits: only {len(chosen)} usable tuning cases in {path}, {count} asked for")
    return chosen, path


def mlp_effect_at_last_subject(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    trace_dir: Path,
    known_file: str | Path | None,
    folder: str | Path | None,
    facts: int,
    samples: int,
) -> list[float]:
    """The average MLP indirect effect at the last subject token per layer, read from
    ``trace_dir`` (a `memit trace` folder) or traced into it first."""
    average = trace_dir / AVERAGE_FILE
    if not (average.is_file() and "mlp" in read_json(average, what="trace averages")):
        path = Path(known_file) if known_file else data_dir(folder) / "known_1000.json"
        if not path.is_file():
            raise InputError(f"known_file: {path} does not exist; run `memit download known` or pass --known-file")
        log.info("Tracing %d known facts into %s", facts, trace_dir)
        trace_dataset(model, tok, load_knowns(path), trace_dir, TraceConfig(kinds=("mlp",), samples=samples, limit=facts))
        summarize_traces(trace_dir, ("mlp",), plots=0)
    effect = read_json(average, what="trace averages")["mlp"]["effect"]["last subject"]
    if len(effect) != model.config.num_hidden_layers:
        raise HyperParamsError(f"trace_dir: {trace_dir} traced a model of {len(effect)} layers, this one has {model.config.num_hidden_layers}")
    return effect
