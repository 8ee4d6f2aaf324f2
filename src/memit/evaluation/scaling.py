"""Scaling curves: metrics against the number of edits made in one batch (log x)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.base import EditOptions
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import DEFAULT_DATASET, data_dir, default_data_file
from memit.evaluation.runner import RUN_IDENTITY, RunConfig, hparams_json, list_runs, run_evaluation
from memit.evaluation.summary import RunSummary, summarize_run
from memit.utils.io import atomic_path, read_json
from memit.utils.progress import progress

log = logging.getLogger(__name__)

CURVES = {
    "efficacy_success": "Efficacy",
    "paraphrase_success": "Paraphrase",
    "neighborhood_success": "Neighborhood",
    "score": "Score",
}


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
    existing = find_run(config, hparams_json(hp))
    if existing is not None:
        log.info("num_edits=%d x %d: reusing %s", config.num_edits, config.sequential_batches, existing)
        config = dataclasses.replace(config, continue_from_run=str(existing))
    return summarize_run(run_evaluation(config, model, tok, hp, options))


def plot_scaling(summaries: list[RunSummary], path: str | Path, title: str = "") -> Path:
    """Efficacy, paraphrase, neighborhood success and Score (post, %) against edits, log x; beside
    it, when the runs recorded it, the update's norm relative to the weights it changes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = [s.params["config"] for s in summaries]
    sequential = any(c.get("sequential_batches", 1) > 1 for c in configs)
    xs = [c["num_edits"] * c.get("sequential_batches", 1) for c in configs]
    xlabel = f"edits so far, in batches of {configs[0]['num_edits']}" if sequential else "number of edits in one batch"
    updates = [s.update_relative for s in summaries]
    with_update = any(u is not None for u in updates)
    fig, axes = plt.subplots(1, 2 if with_update else 1, figsize=(10 if with_update else 6, 4), dpi=120, squeeze=False)
    ax = axes[0][0]
    for key, label in CURVES.items():
        ys = [s.value("post", key) for s in summaries]
        if all(y is None for y in ys):
            continue
        ax.plot(xs, [None if y is None else 100 * y for y in ys], marker="o", label=label)
    pre = [s.value("pre", "neighborhood_success") for s in summaries]
    if any(p is not None for p in pre):
        ax.plot(xs, [None if p is None else 100 * p for p in pre], ls="--", color="grey", label="Neighborhood (unedited)")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("%")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    if with_update:
        right = axes[0][1]
        right.plot(xs, updates, marker="o", color="black")
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel(xlabel)
        right.set_ylabel("‖ΔW‖ / ‖W‖ (edited matrices)")
        right.grid(alpha=0.3, which="both")
        right.set_title("size of the update", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


__all__ = ["cases_for", "find_run", "plot_scaling", "run_scaling", "run_sequential"]
