"""Causal traces over a data set of known facts (ROME's ``known_1000.json``), resumable, with
the average indirect effect per token position and layer.

A run folder holds ``params.json``, one ``traces/<known_id>_<kind>.json`` per fact and kind
(written atomically; a continued run skips them), ``average.json`` and the plots.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.errors import InputError
from memit.models.layout import ModelLayout
from memit.prompt_format import prompt_format
from memit.tracing.causal_trace import KINDS, Trace, noise_level, trace_prompt
from memit.utils.io import read_json, write_json
from memit.utils.paths import child_path, path_component
from memit.utils.progress import progress

log = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
AVERAGE_FILE = "average.json"
# Token positions the paper averages over (Figure 2 of ROME).
POSITIONS = ("first subject", "middle subject", "last subject", "first after", "further after", "last")


@dataclass(frozen=True)
class Known:
    """A fact the model should know: ``prompt`` (with the subject written in) ends before ``attribute``."""

    known_id: int | str
    subject: str
    prompt: str
    attribute: str


@dataclass
class TraceConfig:
    kinds: tuple[str, ...] = KINDS
    samples: int = 10
    window: int = 10
    limit: int | None = None
    seed: int = 0
    # Trace only facts whose attribute starts with the model's next-token prediction.
    known_only: bool = True
    # Ask each fact as a user turn of the tokenizer's chat template; the answer is then the
    # first token of the assistant's reply.
    chat_template: bool = False

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise InputError(f"kinds: {bad} are not among {', '.join(KINDS)}")
        if self.samples < 1 or self.window < 1:
            raise InputError("samples and window: must be at least 1")


def load_knowns(path: str | os.PathLike) -> list[Known]:
    """``known_1000.json``: records with ``known_id``, ``subject``, ``prompt``, ``attribute``."""
    records = read_json(Path(path), what="known facts")
    if not isinstance(records, list) or not records:
        raise InputError(f"{path}: expected a non-empty JSON list of facts")
    knowns = []
    for index, record in enumerate(records):
        for name in ("subject", "prompt", "attribute"):
            if not isinstance(record, dict) or not isinstance(record.get(name), str) or not record[name].strip():
                raise InputError(f"{path}: record {index}: field '{name}' must be a non-empty string")
        if record["subject"] not in record["prompt"]:
            raise InputError(f"{path}: record {index}: field 'prompt' does not contain the subject {record['subject']!r}")
        knowns.append(Known(record.get("known_id", index), record["subject"], record["prompt"], record["attribute"]))
    return knowns


def known_facts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, knowns: list[Known], batch_size: int = 64,
                limit: int | None = None) -> list[Known]:
    """The facts whose attribute starts with the model's next-token prediction after the prompt
    (the first ``limit`` of them: the scan stops once they are found)."""
    kept: list[Known] = []
    side = tok.padding_side
    tok.padding_side = "left"  # the last position is then every row's next token
    try:
        batches = range(0, len(knowns), batch_size)
        for start in progress(batches, desc="known facts", unit="batches", logger=log, leave=False):
            if limit is not None and len(kept) >= limit:
                break
            chunk = knowns[start : start + batch_size]
            batch = tok([k.prompt for k in chunk], padding=True, return_tensors="pt").to(model.get_input_embeddings().weight.device)
            # Positions count from each row's first real token, as without padding.
            positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                tops = model(**batch, position_ids=positions).logits[:, -1].argmax(-1).tolist()
            for known, top in zip(chunk, tops):
                said = tok.decode([top]).strip()
                if said and known.attribute.strip().startswith(said):
                    kept.append(known)
    finally:
        tok.padding_side = side
    return kept[:limit]


def trace_file(out: Path, known: Known, kind: str) -> Path:
    return child_path(out / "traces", f"{path_component(known.known_id)}_{kind}.json")


def trace_dataset(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    knowns: list[Known],
    out: str | os.PathLike,
    config: TraceConfig | None = None,
) -> Path:
    """Trace the facts the model knows (the first ``limit`` of them) for every kind into ``out``;
    a folder traced before is continued (with its stored parameters, which must match)."""
    config = config or TraceConfig()
    out = Path(out)
    params = {"config": dataclasses.asdict(config), "model": getattr(model.config, "_name_or_path", "")}
    if (out / PARAMS_FILE).is_file():
        stored = read_json(out / PARAMS_FILE, what="trace parameters")
        # A continued folder may trace more or fewer facts and kinds, but each trace the same way.
        free = ("limit", "kinds")
        same = {k: v for k, v in json.loads(json.dumps(params["config"])).items() if k not in free}
        # Settings added since the folder was made take their defaults.
        stored_config = {**json.loads(json.dumps(dataclasses.asdict(TraceConfig()))), **stored["config"]}
        if {k: v for k, v in stored_config.items() if k not in free} != same:
            raise InputError(f"out: {out} holds traces made with other parameters ({stored['config']}); choose another folder")
    layout = ModelLayout.from_model(model)
    fmt = prompt_format(tok, config.chat_template)
    knowns = [dataclasses.replace(k, prompt=fmt.prompt(k.prompt)) for k in knowns]
    chosen = (known_facts(model, tok, knowns, limit=config.limit) if config.known_only else knowns)[: config.limit]
    if not chosen:
        raise InputError("knowns: the model predicts none of these facts; pass known_only=False to trace them anyway")
    # The noise scale comes from all the data set's subjects, as the paper's.
    params["noise"] = noise_level(model, tok, [k.subject for k in knowns])
    params["traced_known_ids"] = [k.known_id for k in chosen]
    write_json(out / PARAMS_FILE, params)
    todo = [(k, kind) for k in chosen for kind in config.kinds if not trace_file(out, k, kind).is_file()]
    log.info("%s: tracing %d of %d facts; %d traces to compute", out, len(chosen), len(knowns), len(todo))
    for known, kind in progress(todo, desc="causal traces", unit="traces", logger=log):
        trace = trace_prompt(model, tok, layout, known.prompt, known.subject, kind, params["noise"],
                             config.samples, config.window, seed=config.seed)
        write_json(trace_file(out, known, kind), {"known_id": known.known_id, **dataclasses.asdict(trace)})
    return out


def load_traces(out: str | os.PathLike, kind: str) -> list[Trace]:
    files = sorted((Path(out) / "traces").glob(f"*_{kind}.json"))
    traces = []
    for path in files:
        record = read_json(path, what="trace")
        record.pop("known_id", None)
        record["subject_range"] = tuple(record["subject_range"])
        traces.append(Trace(**record))
    return traces


def position_rows(trace: Trace) -> dict[str, list[int]]:
    """The token indices of each of `POSITIONS` in ``trace`` (some may be empty)."""
    first, end = trace.subject_range
    n = len(trace.tokens)
    return {
        "first subject": [first],
        "middle subject": list(range(first + 1, end - 1)),
        "last subject": [end - 1],
        "first after": [end] if end < n - 1 else [],
        "further after": list(range(end + 1, n - 1)),
        "last": [n - 1],
    }


def average_effect(traces: list[Trace]) -> dict[str, Any]:
    """The average indirect effect (score − corrupted probability) per position and layer, and
    the average clean and corrupted probabilities."""
    if not traces:
        raise InputError("traces: none to average")
    layers = len(traces[0].scores[0])
    sums = {p: torch.zeros(layers, dtype=torch.float64) for p in POSITIONS}
    counts = dict.fromkeys(POSITIONS, 0)
    for trace in traces:
        effect = torch.tensor(trace.scores, dtype=torch.float64) - trace.low
        for position, rows in position_rows(trace).items():
            if rows:
                sums[position] += effect[rows].mean(0)
                counts[position] += 1
    return {
        "kind": traces[0].kind,
        "window": traces[0].window,
        "num_traces": len(traces),
        "high": sum(t.high for t in traces) / len(traces),
        "low": sum(t.low for t in traces) / len(traces),
        "positions": list(POSITIONS),
        "effect": {p: (sums[p] / counts[p]).tolist() if counts[p] else None for p in POSITIONS},
    }


def summarize_traces(out: str | os.PathLike, kinds: tuple[str, ...] = KINDS, plots: int = 3) -> dict[str, Any]:
    """``average.json`` and the plots (averages per kind, the last subject token's effect per
    layer, and heat maps of the first ``plots`` traced facts)."""
    from memit.tracing.plots import plot_average, plot_last_subject, plot_trace

    out = Path(out)
    averages = {kind: average_effect(load_traces(out, kind)) for kind in kinds if list((out / "traces").glob(f"*_{kind}.json"))}
    write_json(out / AVERAGE_FILE, averages)
    for kind, average in averages.items():
        plot_average(average, out / f"average_{kind}.png")
        for trace in load_traces(out, kind)[:plots]:
            plot_trace(trace, out / "heatmaps" / f"{path_component(trace.subject)}_{kind}.png")
    if averages:
        plot_last_subject(averages, out / "last_subject_token.png")
    return averages


__all__ = [
    "AVERAGE_FILE",
    "POSITIONS",
    "Known",
    "TraceConfig",
    "average_effect",
    "load_knowns",
    "load_traces",
    "position_rows",
    "known_facts",
    "summarize_traces",
    "trace_dataset",
]
