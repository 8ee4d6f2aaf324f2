"""The search behind ``memit tune``: MEMIT hyperparameters for a model, chosen by measured edits.

Each trial edits the tuning requests in one batch with a candidate setting, scores the
CounterFact metrics of those requests (efficacy, paraphrase, neighborhood), and undoes the
edit. The stages, each starting from the best setting so far:

1. ``layers``: the candidate edit-layer windows from the causal trace, each with every λ of
   `TuneConfig.lambdas`;
2. ``lambda``: λ refined around the best value;
3. ``z``: the target-vector optimisation's learning rate and step count;
   (in these two refinements a challenger replaces the current setting only when its per-case
   success is higher beyond two standard errors, or equal with a smaller update);
4. ``samples``: the statistics size, the smallest within noise of the largest whose update
   stays within `MAX_UPDATE_CHANGE` of the largest's.

Target vectors depend only on the last edit layer and the optimisation settings, so each is
computed once (cached per request in the work folder); λ and the statistics size change only
the solve.
Every finished trial is written to ``trials.json`` at once, so a killed tune resumes where it
stopped; a time budget stops starting new trials and the best setting so far is kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.base import EditOptions
from memit.editing.common import applied, context_templates, write_over_layers
from memit.editing.memit.hparams import MEMITHyperParams
from memit.editing.memit.main import solve_update
from memit.editing.targets import compute_targets, key_templates
from memit.errors import InputError
from memit.evaluation.datasets import CounterFactCase
from memit.evaluation.datasets.counterfact import GROUPS, score_case, summarize_case
from memit.models.layout import ModelLayout
from memit.models.loading import model_fingerprint
from memit.stats import Corpus, SecondMomentCache
from memit.tuning.layers import candidate_windows
from memit.utils.io import read_json, write_json

log = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
# A smaller statistics size is kept only if its update stays this close to the largest's
# (relative Frobenius distance): a few tuning edits cannot tell a much changed update apart.
MAX_UPDATE_CHANGE = 0.2
TRIALS_FILE = "trials.json"
TIMINGS_FILE = "timings.json"


@dataclass
class TuneConfig:
    """What the search tries."""

    # Width of the edit-layer window (the paper's MEMIT edits 5 layers on GPT-J).
    num_layers: int = 5
    lambdas: tuple[float, ...] = (10.0, 100.0, 1000.0, 10000.0, 100000.0)
    # Multiples of the best λ of the first stage tried next.
    lambda_refinements: tuple[float, ...] = (1 / 3, 3.0)
    # Multiples of the base preset's v_lr and v_num_grad_steps tried in the z stage.
    lr_factors: tuple[float, ...] = (0.2, 2.0)
    step_factors: tuple[float, ...] = (0.6, 1.6)
    # Statistics sizes compared in the last stage; the search itself uses the largest.
    sample_sizes: tuple[int, ...] = (250, 500, 1000, 2000)
    # No new trial starts after this many minutes (the best setting so far is kept).
    budget_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise InputError("num_layers: must be at least 1")
        if not self.lambdas or min(self.lambdas) <= 0:
            raise InputError("lambdas: at least one, all positive")
        if not self.sample_sizes or min(self.sample_sizes) < 1:
            raise InputError("sample_sizes: at least one, all positive")


@dataclass(frozen=True)
class Trial:
    """One candidate setting."""

    layers: tuple[int, ...]
    v_lr: float
    v_num_grad_steps: int
    mom2_update_weight: float
    mom2_n_samples: int

    @property
    def key(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclass
class TrialResult:
    stage: str
    trial: Trial
    efficacy: float
    paraphrase: float
    neighborhood: float
    score: float
    # Mean probability margin of the right target over the three groups.
    magnitude: float
    update_norm: float
    # Mean success over the three groups, per tuning case (for the noise rule).
    per_case: list[float]
    seconds: float
    # ‖ΔW − ΔW_reference‖ / ‖ΔW_reference‖ against the same setting with the most statistics samples.
    update_change: float | None = None

    @property
    def rank(self) -> tuple[float, float, float]:
        """Higher is better: the Score, then the mean success (where a group at zero leaves
        every Score at zero), then the smaller update. Small tuning batches leave many
        settings tied (neighborhood success barely moves with 10 edits); of those, the one
        that changes the weights least keeps most at larger batches."""
        return (round(self.score, 9), round(statistics.fmean(self.per_case), 9), -self.update_norm)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialResult":
        trial = data["trial"]
        return cls(**{**data, "trial": Trial(**{**trial, "layers": tuple(trial["layers"])})})


@dataclass
class TuneResult:
    hparams: MEMITHyperParams
    results: list[TrialResult]
    unedited: dict[str, float]
    provenance: dict[str, Any]

    def preset(self) -> dict[str, Any]:
        """The preset file's content: the hyperparameters and how they were found."""
        return {**self.hparams.to_dict(), "provenance": self.provenance}


def score_requests(model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: Sequence[CounterFactCase]) -> dict[str, Any]:
    """Mean efficacy, paraphrase and neighborhood success, their Score, the mean magnitude,
    and each case's mean success."""
    summaries = [summarize_case(score_case(model, tok, case)) for case in cases]
    means = {g: statistics.fmean(s[f"{g}_success"] for s in summaries) for g in GROUPS}
    return {
        **means,
        "score": statistics.harmonic_mean(list(means.values())),
        "magnitude": statistics.fmean(s[f"{g}_magnitude"] for s in summaries for g in GROUPS),
        "per_case": [statistics.fmean(s[f"{g}_success"] for g in GROUPS) for s in summaries],
    }


def _paired_success(candidate: TrialResult, reference: TrialResult) -> tuple[float, float]:
    """Mean and standard error of the per-case differences in mean success."""
    diffs = [c - r for c, r in zip(candidate.per_case, reference.per_case)]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return statistics.fmean(diffs), stderr


def beyond_noise(candidate: TrialResult, reference: TrialResult) -> bool:
    """``candidate``'s per-case mean success exceeds ``reference``'s by more than two standard
    errors of the paired differences."""
    mean, stderr = _paired_success(candidate, reference)
    return mean > 2 * stderr


def within_noise(candidate: TrialResult, reference: TrialResult) -> bool:
    """``candidate`` is no worse than ``reference`` beyond two standard errors of the paired
    per-case differences in mean success (exactly equal cases count as no difference)."""
    mean, stderr = _paired_success(candidate, reference)
    return mean >= -2 * stderr


class _Search:
    """The state of one tune: the model, the tuning requests, and the finished trials."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        cases: list[CounterFactCase],
        base: MEMITHyperParams,
        corpus: Corpus,
        work_dir: Path,
        options: EditOptions,
        deadline: float | None,
    ):
        self.model, self.tok, self.cases, self.base, self.corpus = model, tok, cases, base, corpus
        self.work_dir, self.options, self.deadline = work_dir, options, deadline
        self.layout = ModelLayout.from_model(model)
        self.requests = [case.request for case in cases]
        self.stats = SecondMomentCache(options.stats_dir)
        self.templates = context_templates(model, tok, base, options)
        self.results: dict[str, TrialResult] = {}
        self._targets: dict[tuple[int, float, int], torch.Tensor] = {}
        self._references: dict[Trial, dict[str, torch.Tensor]] = {}
        self.skipped: list[dict[str, Any]] = []
        if (work_dir / TRIALS_FILE).is_file():
            for record in read_json(work_dir / TRIALS_FILE, what="tuning trials"):
                result = TrialResult.from_dict(record)
                self.results[result.trial.key] = result
        timings_path = work_dir / TIMINGS_FILE
        self.timings: dict[str, float] = read_json(timings_path, what="tuning timings") if timings_path.is_file() else {}

    def timed(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds
        write_json(self.work_dir / TIMINGS_FILE, self.timings)

    def ensure_statistics(self, layers: list[int], sizes: Sequence[int]) -> None:
        start = time.perf_counter()
        hp = self.base
        self.stats.ensure(self.model, self.tok, self.layout, layers, self.corpus, list(sizes), hp.mom2_max_tokens,
                          hp.mom2_dtype, self.options.autocast, self.options.stats_batch_tokens)
        self.timed("statistics", time.perf_counter() - start)

    def targets(self, layer: int, lr: float, steps: int) -> torch.Tensor:
        """The requests' target vectors at ``layer``, computed once per setting (cached in the
        work folder, and in memory: every trial of a setting reads them)."""
        if (layer, lr, steps) in self._targets:
            return self._targets[layer, lr, steps]
        start = time.perf_counter()
        hp = dataclasses.replace(self.base, v_lr=lr, v_num_grad_steps=steps)
        targets = compute_targets(self.model, self.tok, self.layout, self.requests, hp, self.templates, layer,
                                  batch_size=self.options.batch_size, fast=self.options.fast, autocast=self.options.autocast,
                                  cache_dir=self.work_dir / "targets").target.double()
        self.timed("target_vectors", time.perf_counter() - start)
        self._targets[layer, lr, steps] = targets
        return targets

    def run(self, stage: str, trial: Trial, reference: Trial | None = None) -> TrialResult | None:
        """The trial's result (measured now unless finished before); None past the budget.
        With a ``reference``, the result records how far its update is from the reference's."""
        if trial.key in self.results:
            return self.results[trial.key]
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.skipped.append({"stage": stage, **dataclasses.asdict(trial)})
            return None
        self.targets(trial.layers[-1], trial.v_lr, trial.v_num_grad_steps)  # timed on its own when computed
        start = time.perf_counter()
        deltas = self.deltas(trial)
        with applied(self.model, deltas):
            scores = score_requests(self.model, self.tok, self.cases)
        norm = math.sqrt(sum(float(d.double().norm()) ** 2 for d in deltas.values()))
        change = update_change(deltas, self.reference_deltas(reference)) if reference is not None else None
        result = TrialResult(stage, trial, scores["efficacy"], scores["paraphrase"], scores["neighborhood"], scores["score"],
                             scores["magnitude"], norm, scores["per_case"], time.perf_counter() - start, change)
        self.results[trial.key] = result
        write_json(self.work_dir / TRIALS_FILE, [r.to_dict() for r in self.results.values()])
        self.timed("trials", result.seconds)
        log.info("%s %s: efficacy %.2f paraphrase %.2f neighborhood %.2f Score %.3f (%.0f s)", stage, trial,
                 result.efficacy, result.paraphrase, result.neighborhood, result.score, result.seconds)
        return result

    def reference_deltas(self, trial: Trial) -> dict[str, torch.Tensor]:
        """The update of ``trial``, computed once for all the trials compared with it."""
        if trial not in self._references:
            self._references = {trial: self.deltas(trial)}
        return self._references[trial]

    def deltas(self, trial: Trial) -> dict[str, torch.Tensor]:
        """The trial's MEMIT update (the model is left as it was)."""
        targets = self.targets(trial.layers[-1], trial.v_lr, trial.v_num_grad_steps)
        layers = list(trial.layers)
        moments = self.stats.get(self.model, self.tok, self.layout, layers, self.corpus, trial.mom2_n_samples,
                                 self.base.mom2_max_tokens, self.base.mom2_dtype, self.options.autocast,
                                 self.options.stats_batch_tokens)

        def solve(_: int, layer: int, keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return solve_update(keys, residual, moments[layer], trial.mom2_update_weight)

        keys_at = key_templates(self.tok, self.templates, self.base)
        return write_over_layers(self.model, self.tok, self.layout, self.requests, layers, targets, keys_at, solve)

    def best(self, results: list[TrialResult | None]) -> TrialResult | None:
        found = [r for r in results if r is not None]
        return max(found, key=lambda r: r.rank) if found else None

    @staticmethod
    def refine(current: TrialResult, results: list[TrialResult | None]) -> TrialResult:
        """The current setting, unless a challenger beats it beyond noise or ties it exactly with
        a smaller update: a refinement stage compares several settings with the current one,
        and taking the highest on a gain within noise chases noise."""
        def displaces(r: TrialResult) -> bool:
            tied = r.rank[:2] == current.rank[:2]
            return (tied and r.rank > current.rank) or (r.rank > current.rank and beyond_noise(r, current))

        challengers = [r for r in results if r is not None and displaces(r)]
        return max(challengers, key=lambda r: r.rank) if challengers else current


def tune(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    cases: list[CounterFactCase],
    base: MEMITHyperParams,
    mlp_effect: list[float],
    corpus: Corpus,
    work_dir: str | Path,
    config: TuneConfig | None = None,
    options: EditOptions | None = None,
    provenance: dict[str, Any] | None = None,
) -> TuneResult:
    """Search MEMIT's edit layers, λ, z learning rate and steps, and statistics size for
    ``model`` (stages in the module's docstring), starting from ``base``.

    ``mlp_effect``: the traced average effect of restoring MLP outputs at the last subject
    token, per layer. ``cases``: the tuning requests, all edited in one batch per trial.
    ``work_dir`` keeps the trials, target vectors and timings; a folder used before is
    continued, and must have been started with the same model, requests and settings.
    """
    config = config or TuneConfig()
    options = options or EditOptions()
    if not cases:
        raise InputError("cases: the tuning needs at least one CounterFact request")
    work_dir = Path(work_dir)
    windows = candidate_windows(mlp_effect, config.num_layers)
    identity = _identity(model, cases, base, mlp_effect, corpus, config)
    _check_work_dir(work_dir, identity)
    started = time.monotonic()
    deadline = started + 60 * config.budget_minutes if config.budget_minutes is not None else None
    search = _Search(model, tok, cases, base, corpus, work_dir, options, deadline)

    start = time.perf_counter()
    unedited = score_requests(model, tok, cases)
    search.timed("unedited", time.perf_counter() - start)
    largest = max(config.sample_sizes)
    search.ensure_statistics(sorted({layer for w in windows for layer in w}), config.sample_sizes)

    lr, steps = base.v_lr, base.v_num_grad_steps
    best = search.best([search.run("layers", Trial(tuple(w), lr, steps, lam, largest)) for w in windows for lam in config.lambdas])
    if best is None:
        raise InputError("budget_minutes: the budget ended before the first trial; give the tuning more time")
    t = best.trial
    best = search.refine(best, [search.run("lambda", dataclasses.replace(t, mom2_update_weight=t.mom2_update_weight * f))
                                for f in config.lambda_refinements])
    t = best.trial
    z_settings = [(t.v_lr * f, t.v_num_grad_steps) for f in config.lr_factors]
    z_settings += [(t.v_lr, max(1, round(t.v_num_grad_steps * f))) for f in config.step_factors]
    best = search.refine(best, [search.run("z", dataclasses.replace(t, v_lr=lr_, v_num_grad_steps=s)) for lr_, s in z_settings])
    t = best.trial
    by_size = {n: search.run("samples", dataclasses.replace(t, mom2_n_samples=n), reference=t) for n in sorted(config.sample_sizes) if n != largest}
    by_size[largest] = best
    chosen_size = min(n for n, r in by_size.items() if n == largest or (r is not None and within_noise(r, best)
                                                                          and r.update_change is not None and r.update_change <= MAX_UPDATE_CHANGE))
    final = by_size[chosen_size]

    hparams = dataclasses.replace(base, layers=list(t.layers), v_lr=t.v_lr, v_num_grad_steps=t.v_num_grad_steps,
                                  mom2_update_weight=t.mom2_update_weight, mom2_n_samples=chosen_size)
    hparams.validate()
    results = list(search.results.values())
    record = {
        **(provenance or {}),
        "tool": "memit tune",
        "date": time.strftime("%Y-%m-%d"),
        "model_fingerprint": identity["model_fingerprint"],
        "corpus": corpus.identity,
        "tuning_case_ids": identity["case_ids"],
        "trace_mlp_effect_last_subject": [round(e, 5) for e in mlp_effect],
        "candidate_windows": windows,
        "window_rule": f"{config.num_layers} layers ending at, centred on and starting at the traced MLP peak; the best measured kept",
        "objective": "Score (harmonic mean of efficacy, paraphrase and neighborhood success) of one batch edit of the tuning requests; "
                     "ties broken by the mean success, then by the smaller update norm",
        "sample_size_rule": "the smallest statistics size whose per-case mean success is within two standard errors of the largest's "
                            f"and whose update is within {MAX_UPDATE_CHANGE:.0%} of the largest's",
        "unedited": {k: v for k, v in unedited.items() if k != "per_case"},
        "chosen": {"score": final.score, "efficacy": final.efficacy, "paraphrase": final.paraphrase, "neighborhood": final.neighborhood},
        "trials": [_table_row(r) for r in results],
        "skipped_for_budget": search.skipped,
        "seconds": {k: round(v, 1) for k, v in search.timings.items()},
    }
    return TuneResult(hparams, results, unedited, record)


def update_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖b‖ over all matrices."""
    diff = sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in b)
    return math.sqrt(diff) / math.sqrt(sum(float(v.double().norm()) ** 2 for v in b.values()))


def _table_row(result: TrialResult) -> dict[str, Any]:
    row = {"stage": result.stage, **dataclasses.asdict(result.trial)}
    row["layers"] = f"{result.trial.layers[0]}-{result.trial.layers[-1]}"
    for name in ("efficacy", "paraphrase", "neighborhood", "score", "update_norm", "update_change", "seconds"):
        value = getattr(result, name)
        row[name] = round(value, 4) if value is not None else None
    return row


def _identity(model: PreTrainedModel, cases: list[CounterFactCase], base: MEMITHyperParams, mlp_effect: list[float],
              corpus: Corpus, config: TuneConfig) -> dict[str, Any]:
    fixed = {k: v for k, v in base.to_dict().items() if k not in ("layers", "v_lr", "v_num_grad_steps", "mom2_update_weight", "mom2_n_samples")}
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "budget_minutes"}
    return {
        "model_fingerprint": model_fingerprint(model),
        "case_ids": [case.case_id for case in cases],
        "requests": hashlib.sha256(json.dumps([c.request.to_dict() for c in cases], sort_keys=True).encode()).hexdigest()[:16],
        "base": {**fixed, "v_lr": base.v_lr, "v_num_grad_steps": base.v_num_grad_steps},
        "mlp_effect": [round(e, 6) for e in mlp_effect],
        "corpus": corpus.identity,
        **json.loads(json.dumps(settings)),
    }


def _check_work_dir(work_dir: Path, identity: dict[str, Any]) -> None:
    path = work_dir / PARAMS_FILE
    if path.is_file():
        stored = read_json(path, what="tuning parameters")
        if stored != identity:
            changed = sorted(k for k in identity if stored.get(k) != identity[k])
            raise InputError(f"work_dir: {work_dir} holds a tuning of another setting (differs in {changed}); choose another folder")
    else:
        write_json(path, identity)


__all__ = ["Trial", "TrialResult", "TuneConfig", "TuneResult", "score_requests", "tune", "within_noise"]
