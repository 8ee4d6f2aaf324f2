"""Scaling curves: metrics against the number of edits made in one batch (log x)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.base import EditOptions
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import DEFAULT_DATASET, data_dir, default_data_file
from memit.evaluation.run_folders import RUN_IDENTITY, RunConfig, hparams_json, list_runs
from memit.evaluation.runner import run_evaluation
from memit.evaluation.summary import RunSummary, summarize_run
from memit.utils import distributed
from memit.utils.io import atomic_path, read_json
from memit.utils.progress import progress

log = logging.getLogger(__name__)

PANELS = (
    ("efficacy_success", "Efficacy success (%)"),
    ("paraphrase_success", "Paraphrase success (%)"),
    ("neighborhood_success", "Neighborhood success (%)"),
    ("fluency", "Fluency (n-gram entropy x 100)"),
    ("update_relative", "‖ΔW‖ / ‖W‖ (edited matrices)"),
    ("update_unwritten", "Target change left unwritten (%)"),
)
# The panels read from RunSummary's update fields, with the factor each is plotted at.
UPDATE_PANELS = {"update_relative": 1, "update_unwritten": 100}


def cases_for(num_edits: int, min_cases: int) -> int:
    """Cases evaluated at one point: at least ``min_cases``, a whole number of batches."""
    batches = max(1, -(-min_cases // num_edits))
    return batches * num_edits


def find_run(config: RunConfig, hparams: dict) -> Path | None:
    """An existing run of the same configuration and hyperparameters, to reuse or continue."""
    want = {k: getattr(config, k) for k in RUN_IDENTITY}
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    for run_dir in list_runs(config.out, config.alg):
        stored = read_json(run_dir / "params.json", what="run parameters")
        # Runs stored before an option existed ran with its default.
        got = {k: stored.get("config", {}).get(k, defaults[k]) for k in RUN_IDENTITY}
        if got == want and stored.get("hparams") == hparams:
            return run_dir
    return None


def run_scaling(
    base: RunConfig,
    num_edits: list[int],
    min_cases: int,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    hparams=None,
    options: EditOptions | None = None,
) -> list[RunSummary]:
    """One run per batch size (reusing or continuing finished ones); their summaries."""
    hp = resolve_hparams(base.alg, hparams if hparams is not None else base.hparams, model)
    data_file = Path(base.data_file) if base.data_file else default_data_file(base.dataset or DEFAULT_DATASET, data_dir(base.data_dir))
    summaries = []
    for n in progress(sorted(num_edits), desc="scaling runs", unit="runs", logger=log):
        config = dataclasses.replace(
            base, num_edits=n, sequential_batches=1, limit=cases_for(n, min_cases), data_file=str(data_file.resolve())
        )
        summaries.append(_run_or_continue(config, model, tok, hp, options))
    return summaries


def run_sequential(
    base: RunConfig,
    num_edits: int,
    checkpoints: list[int],
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    hparams=None,
    options: EditOptions | None = None,
) -> list[RunSummary]:
    """Sequential editing measured along the way (AlphaEdit's protocol): for each checkpoint
    k, batches of ``num_edits`` applied one after another k times, then all k x num_edits
    cases scored. With ``base.reuse_edits`` a checkpoint reloads the batches of the earlier
    ones (their edit keys chain), so each batch is computed once."""
    hp = resolve_hparams(base.alg, hparams if hparams is not None else base.hparams, model)
    data_file = Path(base.data_file) if base.data_file else default_data_file(base.dataset or DEFAULT_DATASET, data_dir(base.data_dir))
    summaries = []
    for k in progress(sorted(checkpoints), desc="sequential checkpoints", unit="runs", logger=log):
        config = dataclasses.replace(base, num_edits=num_edits, sequential_batches=k, limit=num_edits * k, data_file=str(data_file.resolve()))
        summaries.append(_run_or_continue(config, model, tok, hp, options))
    return summaries


def _run_or_continue(config: RunConfig, model: PreTrainedModel, tok: PreTrainedTokenizerBase, hp, options: EditOptions | None) -> RunSummary:
    # Rank 0 decides: another process looking later would find the folder rank 0 just made.
    existing = distributed.broadcast(find_run(config, hparams_json(hp)))
    if existing is not None:
        log.info("num_edits=%d x %d: reusing %s", config.num_edits, config.sequential_batches, existing)
        config = dataclasses.replace(config, continue_from_run=str(existing))
    return summarize_run(run_evaluation(config, model, tok, hp, options))


Series = dict[str, dict[str, tuple[list[int], list[float | None]]]]


def scaling_series(summaries: list[RunSummary], labels: list[str] | None = None) -> Series:
    """Panel (metric key) -> line (method, or "unedited") -> (edits, values x 100), for the
    panels of `PANELS` that some run recorded. ``labels`` (one per summary) names the lines
    instead of the method, for runs of one method with different settings. The unedited line
    comes from the runs of the line with the most points (the pre-edit scores of their cases)."""
    names = labels or [str(s.params["config"].get("alg")) for s in summaries]
    by_line: dict[str, list[RunSummary]] = {}
    for name, s in zip(names, summaries):
        by_line.setdefault(name, []).append(s)
    for runs in by_line.values():
        runs.sort(key=edits_so_far)
    widest = max(by_line.values(), key=len)

    def line(runs: list[RunSummary], phase: str, key: str) -> tuple[list[int], list[float | None]]:
        if key in UPDATE_PANELS:
            # What the edit did to the weights: no unedited value.
            values = [getattr(s, key) if phase == "post" else None for s in runs]
            ys = [None if v is None else UPDATE_PANELS[key] * v for v in values]
        else:
            ys = [None if (v := s.value(phase, key)) is None else 100 * v for s in runs]
        return [edits_so_far(s) for s in runs], ys

    series: Series = {}
    for key, _ in PANELS:
        lines = {name: line(runs, "post", key) for name, runs in by_line.items()}
        if all(y is None for _, ys in lines.values() for y in ys):
            continue
        pre = line(widest, "pre", key)
        if any(y is not None for y in pre[1]):
            lines["unedited"] = pre
        series[key] = lines
    return series


def plot_scaling(summaries: list[RunSummary], path: str | Path, title: str = "", labels: list[str] | None = None) -> Path:
    """One panel per metric against the number of edits (log x where they span a decade), a line per method
    or label (`scaling_series`); runs of several methods (``memit summarize --plot``) share the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = scaling_series(summaries, labels)
    configs = [s.params["config"] for s in summaries]
    sequential = any(c.get("sequential_batches", 1) > 1 for c in configs)
    xlabel = f"edits so far, in batches of {configs[0]['num_edits']}" if sequential else "edits in one batch"
    labels = dict(PANELS)
    edits = [edits_so_far(s) for s in summaries]
    fig, axes = plt.subplots(1, len(series), figsize=(3.2 * len(series), 3.4), dpi=120, squeeze=False)
    for ax, (key, lines) in zip(axes[0], series.items()):
        for name, (xs, ys) in lines.items():
            style = {"ls": "--", "marker": "x", "color": "grey"} if name == "unedited" else {"marker": "o"}
            ax.plot(xs, ys, label=name, ms=3, **style)
        if max(edits) >= 10 * min(edits):
            ax.set_xscale("log")
        if key == "update_relative":
            ax.set_yscale("log")
        elif key != "fluency":
            ax.set_ylim(0, 102)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_title(labels[key], fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def edits_so_far(summary: RunSummary) -> int:
    config = summary.params["config"]
    return config["num_edits"] * config.get("sequential_batches", 1)


__all__ = ["cases_for", "edits_so_far", "find_run", "plot_scaling", "run_scaling", "run_sequential", "scaling_series"]
