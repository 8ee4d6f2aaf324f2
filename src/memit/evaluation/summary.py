"""Summaries of runs: mean and standard deviation of each metric over cases, before (pre)
and after (post) the edit, as the paper's ``summarize.py`` reports them; the Score is the
harmonic mean of the mean efficacy, paraphrase and neighborhood success."""
from __future__ import annotations

import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memit.errors import InputError, MissingFileError
from memit.evaluation.answers import JudgedAnswer, answer_metrics, first_said, mentions, unchanged_share
from memit.evaluation.datasets import DATASETS
from memit.evaluation.run_folders import PARAMS_FILE
from memit.utils.io import read_json

log = logging.getLogger(__name__)

SUCCESS_KEYS = ("efficacy_success", "paraphrase_success", "neighborhood_success")
METRICS = (
    *SUCCESS_KEYS,
    "efficacy_magnitude",
    "paraphrase_magnitude",
    "neighborhood_magnitude",
    "efficacy_acc",
    "paraphrase_acc",
    "neighborhood_acc",
    "portability_acc",
    "multihop_success",
)
# Groups of the generated-answer metrics: gen_<group> (first thing said) and gen_<group>_em.
ANSWER_GROUPS = ("efficacy", "paraphrase", "neighborhood", "portability", "multihop")
ANSWER_KEYS = (
    *(key for g in ANSWER_GROUPS for key in (f"gen_{g}", f"gen_{g}_em", f"gen_{g}_mention")),
    "gen_neighborhood_unchanged", "gen_neighborhood_new",
)
METRICS = (*METRICS, *ANSWER_KEYS, "fluency", "consistency")
JSON_KEYS = (
    *SUCCESS_KEYS, "efficacy_acc", "paraphrase_acc", "neighborhood_acc", "portability_acc", "multihop_success",
    "score", *ANSWER_KEYS, "fluency", "consistency", "num_cases",
)
LABELS = {
    "score": "Score",
    "efficacy_success": "Efficacy success",
    "paraphrase_success": "Paraphrase success",
    "neighborhood_success": "Neighborhood success",
    "efficacy_magnitude": "Efficacy magnitude",
    "paraphrase_magnitude": "Paraphrase magnitude",
    "neighborhood_magnitude": "Neighborhood magnitude",
    "efficacy_acc": "Efficacy acc",
    "paraphrase_acc": "Paraphrase acc",
    "neighborhood_acc": "Neighborhood acc",
    "portability_acc": "Portability acc",
    "multihop_success": "Multi-hop success",
    **{f"gen_{g}": f"Generated {g} (first said)" for g in ANSWER_GROUPS},
    **{f"gen_{g}_em": f"Generated {g} (exact)" for g in ANSWER_GROUPS},
    **{f"gen_{g}_mention": f"Generated {g} (mentioned)" for g in ANSWER_GROUPS},
    "gen_neighborhood_unchanged": "Generated neighborhood unchanged",
    "gen_neighborhood_new": "Generated neighborhood = new target",
    "fluency": "Fluency (n-gram entropy)",
    "consistency": "Consistency (tf-idf)",
}


@dataclass
class Stat:
    mean: float
    std: float
    n: int


@dataclass
class RunSummary:
    """Per phase ('pre', 'post'): metric -> Stat over the cases that have it."""

    run_dir: Path
    params: dict[str, Any]
    num_cases: int
    stats: dict[str, dict[str, Stat]] = field(default_factory=dict)
    consistency_tfidf: str | None = None
    edit_seconds: float = 0.0  # summed over the run's groups
    target_seconds: float = 0.0  # the part of edit_seconds spent on target vectors
    post_seconds: float = 0.0  # scoring the edited model, summed over cases
    # The groups' mean update norm, absolute and relative to the changed weights (None for
    # runs recorded before it was).
    update_norm: float | None = None
    update_relative: float | None = None
    # The share of the target change the last batch's solve left unwritten (MEMIT, AlphaEdit).
    update_unwritten: float | None = None

    def score(self, phase: str) -> float | None:
        means = [self.stats[phase].get(k) for k in SUCCESS_KEYS]
        if any(m is None for m in means):
            return None
        return statistics.harmonic_mean([m.mean for m in means])

    def value(self, phase: str, key: str) -> float | None:
        if key == "score":
            return self.score(phase)
        if key == "num_cases":
            return self.num_cases
        stat = self.stats[phase].get(key)
        return None if stat is None else stat.mean

    @property
    def merged_subject_cases(self) -> int | None:
        """How many cases had a subject ending inside a token, edited at that token (None
        for runs recorded before it was counted)."""
        merged = self.params.get("merged_subject_case_ids")
        return None if merged is None else len(merged)

    def to_record(self) -> dict[str, Any]:
        """All of the summary, plain JSON: `from_record` rebuilds it once the run folder is gone."""
        return {**asdict(self), "run_dir": str(self.run_dir)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "RunSummary":
        stats = {phase: {key: Stat(**stat) for key, stat in by_key.items()} for phase, by_key in record["stats"].items()}
        return cls(**{**record, "run_dir": Path(record["run_dir"]), "stats": stats})

    def to_json(self) -> dict[str, Any]:
        config = self.params.get("config", {})
        out: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "alg": config.get("alg"),
            "model": config.get("model"),
            "dataset": config.get("dataset"),
            "num_edits": config.get("num_edits"),
            "sequential_batches": config.get("sequential_batches"),
            "prompt_format": prompt_format_of(self.params),
        }
        for key in JSON_KEYS:
            out[key] = {phase: self.value(phase, key) for phase in ("pre", "post")}
        out["std"] = {
            key: {phase: (s.std if (s := self.stats[phase].get(key)) else None) for phase in ("pre", "post")}
            for key in METRICS
        }
        for key in ("efficacy_magnitude", "paraphrase_magnitude", "neighborhood_magnitude"):
            out[key] = {phase: self.value(phase, key) for phase in ("pre", "post")}
        out["consistency_tfidf"] = self.consistency_tfidf
        out["update_norm"], out["update_relative"] = self.update_norm, self.update_relative
        out["update_unwritten"] = self.update_unwritten
        out["merged_subject_cases"] = self.merged_subject_cases
        return out


def prompt_format_of(params: dict[str, Any]) -> str:
    """``chat`` or ``raw``: how the run's questions reached the model."""
    return "chat" if params.get("config", {}).get("chat_template") else "raw"


def load_case_records(run_dir: Path, any_groups: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    return [with_derived_metrics(_case_record(path), any_groups) for path in sorted(run_dir.glob("case_*.json"))]


def _case_record(path: Path) -> dict[str, Any]:
    record = read_json(path, what="case file")
    if not isinstance(record, dict) or not isinstance(record.get("post"), dict):
        raise InputError(f"case file {path}: not a case result (a JSON object with 'pre' and 'post' metrics)")
    return record


def with_derived_metrics(record: dict[str, Any], any_groups: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Adds what the neighborhood answers say about the edit: the share whose head is
    unchanged from the unedited model's (post only), and the share that start with the
    case's new target (the edit bleeding into facts it must not touch); and the
    ``gen_<group>_mention`` shares for case files written before they were."""
    pre, post = record.get("pre", {}), record.get("post", {})
    for phase in (pre, post):
        judged = phase.get("generated_answers")
        if judged and not any(key.endswith("_mention") for key in phase):
            rejudged = [JudgedAnswer(**{**j, "mentions": mentions(j["generated"], j["answers"])}) for j in judged]
            phase.update({k: v for k, v in answer_metrics(rejudged, any_groups).items() if k.endswith("_mention")})
    if "generated_answers" in pre and "generated_answers" in post:
        post["gen_neighborhood_unchanged"] = unchanged_share(pre["generated_answers"], post["generated_answers"], "neighborhood")
    target = record.get("requested_rewrite", {}).get("target_new", {}).get("str")
    for phase in (pre, post):
        said = [a["generated"] for a in phase.get("generated_answers", []) if a["group"] == "neighborhood"]
        if target and said:
            phase["gen_neighborhood_new"] = sum(first_said(g, [target]) for g in said) / len(said)
    return record


def summarize_run(run_dir: str | Path) -> RunSummary:
    """The means of every metric over the finished cases of a run folder (``run_dir`` from
    `run_evaluation`), before and after the edit; raises ``MissingFileError`` when
    ``run_dir`` is not a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / PARAMS_FILE).is_file():
        raise MissingFileError(f"run: {run_dir} has no {PARAMS_FILE}; is it a run folder?")
    params = read_json(run_dir / PARAMS_FILE, what="run parameters")
    if not isinstance(params, dict):
        raise InputError(f"run parameters {run_dir / PARAMS_FILE}: expected a JSON object")
    spec = DATASETS.get(params.get("config", {}).get("dataset") or "")
    records = load_case_records(run_dir, spec.any_groups if spec is not None else frozenset())
    summary = RunSummary(run_dir, params, len(records))
    for phase in ("pre", "post"):
        summary.stats[phase] = {}
        for key in METRICS:
            values = [r[phase][key] for r in records if r.get(phase, {}).get(key) is not None]
            if values:
                summary.stats[phase][key] = Stat(statistics.fmean(values), statistics.pstdev(values), len(values))
    groups = {tuple(r.get("grouped_case_ids", [r.get("case_id")])): r for r in records}
    summary.edit_seconds = sum(r.get("time", {}).get("edit_seconds", 0.0) for r in groups.values())
    summary.target_seconds = sum(r.get("time", {}).get("target_seconds", 0.0) for r in groups.values())
    updates = [r["update"] for r in groups.values() if "update" in r]
    if updates:
        summary.update_norm = statistics.fmean(u["norm"] for u in updates)
        summary.update_relative = statistics.fmean(u["relative"] for u in updates)
        unwritten = [u["unwritten"] for u in updates if "unwritten" in u]
        summary.update_unwritten = statistics.fmean(unwritten) if unwritten else None
    summary.post_seconds = sum(r.get("time", {}).get("post_seconds", 0.0) for r in records)
    sources = {r["post"].get("consistency_tfidf") for r in records if r.get("post", {}).get("consistency_tfidf")}
    summary.consistency_tfidf = ",".join(sorted(sources)) or None
    return summary


def metric_labels(dataset: str | None) -> dict[str, str]:
    """Labels of the metrics, with the overrides of the run's data set (if still known)."""
    spec = DATASETS.get(dataset) if dataset else None
    return {**LABELS, **(spec.labels if spec is not None else {})}


def format_table(summary: RunSummary) -> str:
    """A paper-style table: mean ± std x 100 for rates and fluency, pre and post."""
    config = summary.params.get("config", {})
    planned = summary.params.get("planned_cases")
    unfinished = f" of {planned} (unfinished)" if planned not in (None, summary.num_cases) else ""
    head = (
        f"{summary.run_dir}  alg={config.get('alg')} model={config.get('model')} dataset={config.get('dataset')} "
        f"num_edits={config.get('num_edits')} sequential_batches={config.get('sequential_batches')} cases={summary.num_cases}{unfinished} "
        f"prompts={prompt_format_of(summary.params)}"
    )
    if summary.merged_subject_cases:
        head += f" merged_subject_cases={summary.merged_subject_cases}"
    lines = [head, f"{'metric (x100)':<34}{'pre':>18}{'post':>18}"]
    labels = metric_labels(config.get("dataset"))
    for key in ("score", *METRICS):
        cells = []
        for phase in ("pre", "post"):
            if key == "score":
                value = summary.score(phase)
                cells.append("-" if value is None else f"{100 * value:.1f}")
            else:
                stat = summary.stats[phase].get(key)
                cells.append("-" if stat is None else f"{100 * stat.mean:.1f} ± {100 * stat.std:.1f}")
        if all(c == "-" for c in cells):
            continue
        label = labels[key]
        if key == "consistency" and summary.consistency_tfidf and summary.consistency_tfidf != "paper":
            label += " [not the paper's idf]"
        lines.append(f"{label:<34}{cells[0]:>18}{cells[1]:>18}")
    return "\n".join(lines)


# (column, metric) of the comparison table; data sets without success rates (zsRE) show
# accuracies and, where they have it, portability.
_GENERATED_COLUMNS = (
    ("gen. efficacy", "gen_efficacy"), ("(mentioned)", "gen_efficacy_mention"),
    ("gen. paraphrase", "gen_paraphrase"), ("(mentioned)", "gen_paraphrase_mention"), ("gen. neighborhood", "gen_neighborhood"),
)
_NEIGHBORHOOD_COLUMNS = (("gen. unchanged", "gen_neighborhood_unchanged"), ("gen. says new", "gen_neighborhood_new"))
SUCCESS_COLUMNS = (
    ("efficacy", "efficacy_success"), ("paraphrase", "paraphrase_success"), ("neighborhood", "neighborhood_success"),
    ("Score", "score"), *_GENERATED_COLUMNS, *_NEIGHBORHOOD_COLUMNS, ("fluency", "fluency"),
)
ACCURACY_COLUMNS = (
    ("efficacy acc", "efficacy_acc"), ("paraphrase acc", "paraphrase_acc"), ("neighborhood acc", "neighborhood_acc"),
    ("portability acc", "portability_acc"), *_GENERATED_COLUMNS, ("gen. portability", "gen_portability"),
    ("(mentioned)", "gen_portability_mention"), *_NEIGHBORHOOD_COLUMNS,
)


def comparison_columns(summaries: list[RunSummary]) -> tuple[tuple[str, str], ...]:
    has_success = any(s.value(phase, "efficacy_success") is not None for s in summaries for phase in ("pre", "post"))
    return SUCCESS_COLUMNS if has_success or not summaries else ACCURACY_COLUMNS


def format_comparison(summaries: list[RunSummary]) -> str:
    """One Markdown row per run (post-edit means x 100), after a row for the unedited model
    per prompt format and number of cases (the pre values of the first such run), with the
    seconds spent editing and scoring."""
    columns = comparison_columns(summaries)

    def cells(summary: RunSummary, phase: str) -> list[str]:
        values = [summary.value(phase, key) for _, key in columns]
        return ["-" if v is None else f"{100 * v:.1f}" for v in values]

    head = ["method", "edits", "prompts", "cases", *(label for label, _ in columns), "‖ΔW‖/‖W‖", "edit s", "scoring s"]
    rows = [head, ["---"] * 4 + ["---:"] * (len(head) - 4)]
    # The unedited model scores differently under each prompt format and on each number of
    # cases (a scaling curve's points): a row for each.
    first_of_kind: dict[tuple[str, int], RunSummary] = {}
    for s in summaries:
        first_of_kind.setdefault((prompt_format_of(s.params), s.num_cases), s)
    for (fmt, num_cases), first in first_of_kind.items():
        rows.append(["unedited", "-", fmt, str(num_cases), *cells(first, "pre"), "-", "-", "-"])
    for s in summaries:
        config = s.params.get("config", {})
        batches = config.get("sequential_batches", 1)
        edits = f"{config.get('num_edits')}" if batches == 1 else f"{batches} x {config.get('num_edits')} sequential"
        update = "-" if s.update_relative is None else f"{s.update_relative:.3g}"
        rows.append([str(config.get("alg")), edits, prompt_format_of(s.params), str(s.num_cases), *cells(s, "post"), update,
                     f"{s.edit_seconds:.0f}", f"{s.post_seconds:.0f}"])
    return markdown_table(rows)


def markdown_table(rows: list[list[str]]) -> str:
    """Rows of cells (the head, the alignment row, the body) as Markdown table lines."""
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def summaries_json(summaries: list[RunSummary]) -> str:
    return json.dumps([s.to_json() for s in summaries], indent=2)


__all__ = ["RunSummary", "Stat", "format_comparison", "format_table", "summaries_json", "summarize_run"]
