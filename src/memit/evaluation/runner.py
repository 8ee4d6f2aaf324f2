"""Evaluation runs: edit ``num_edits`` cases at a time, score every case before and after,
and write one JSON per case into ``<out>/<ALG>/run_<NNN>/`` (atomically, so a killed run
never leaves a half-written case file). A run continued later skips finished cases.
Run folders are `memit.evaluation.run_folders`, scoring `memit.evaluation.scoring`,
saved edits `memit.evaluation.edit_cache`."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.editing.base import EditOptions, Editor
from memit.editing.hparams import HyperParams
from memit.editing.methods import get_editor_class, resolve_hparams
from memit.evaluation.datasets import DEFAULT_DATASET, Case, DatasetSpec, data_dir, get_dataset, load_cases
from memit.evaluation.datasets.base import case_requests
from memit.evaluation.edit_cache import EDIT_CACHE, batch_requests, deltas_dir, edit_key, edit_or_reload, update_size
from memit.evaluation.run_folders import RunConfig, RunError, case_file, resolve_config, start_run
from memit.evaluation.scoring import GenerationResources, Scoring, evaluate_cases, has_generation, in_groups
from memit.prompt_format import prompt_format
from memit.requests import EditRequest, RequestError, check_tokenization, conflict_key, parse_requests
from memit.utils import distributed
from memit.utils.io import read_json, write_json
from memit.utils.progress import progress

log = logging.getLogger(__name__)


@dataclass
class RunHooks:
    """Callbacks for progress and tests: after each written case, and around each edit."""

    on_case_done: Callable[[Path], None] | None = None
    on_edit: Callable[[list[Case]], None] | None = None
    on_start: Callable[[Path], None] | None = None  # the run folder, before any case is edited


def pre_cache_dir(config: RunConfig, model: PreTrainedModel, with_generation: bool) -> Path:
    """Where unedited-model metrics are cached across runs of the same model and data file
    (the model must be unedited when a run starts; runs restore it after every group)."""
    from memit.models.loading import model_fingerprint

    key = f"{Path(config.data_file or '').resolve()}|{config.dataset}|{with_generation}|{config.generation_tokens}"
    if config.chat_template or config.answer_limit is not None:  # a run with neither reads caches written before these options
        key += f"|chat={config.chat_template}|answers={config.answer_limit}"
    if with_generation and config.generation_interval > 1:
        key += f"|interval={config.generation_interval}"
    return Path(config.out) / ".pre_cache" / model_fingerprint(model) / hashlib.sha256(key.encode()).hexdigest()[:16]


def _pre_metrics(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    cases: list[Case],
    scoring: Scoring,
    config: RunConfig,
    cache: Path | None,
) -> dict[Any, dict[str, Any]]:
    """Unedited-model metrics of ``cases``, read from and added to the cache."""
    def path(case: Case) -> Path | None:
        return case_file(cache, case) if cache is not None else None

    pre = {c.case_id: read_json(p, what="cached pre-edit metrics") for c in cases if (p := path(c)) is not None and p.is_file()}
    todo = [c for c in cases if c.case_id not in pre]
    scored = evaluate_cases(model, tok, todo, scoring, _run_spec(config))
    for case, metrics, _ in progress(scored, total=len(todo), desc="unedited scoring", unit="cases", logger=log, leave=False):
        if (p := path(case)) is not None:
            write_json(p, metrics)
        pre[case.case_id] = metrics
    return pre


def _run_spec(config: RunConfig) -> DatasetSpec:
    """The data set of a started run (its config names the loaded or detected one)."""
    return get_dataset(config.dataset or DEFAULT_DATASET)


def editable_cases(cases: list[Case], tok: PreTrainedTokenizerBase, limit: int | None, batch_size: int | None = None) -> tuple[list[Case], list]:
    """The first ``limit`` cases that can be edited in batches of ``batch_size`` (None: one
    batch), and the ids of those skipped: a subject that no token of the prompt covers, or a
    request that contradicts one earlier in its batch (the same subject and prompt, another
    target; the paper's MultiCounterFact drops such conflicts, and a batch cannot hold both).
    A subject whose last characters the tokenizer merges with what follows (")?" in
    "(APA-56)?") is kept and edited at that token, as in the paper's code
    (`merged_subject_case_ids` counts those)."""
    kept: list[Case] = []
    skipped: list = []
    batch_targets: dict[tuple[str, str], str] = {}
    for case in cases:
        if limit is not None and len(kept) >= limit:
            break
        if batch_size is not None and len(kept) % batch_size == 0:
            batch_targets = {}
        requests = list(case_requests(case))
        reason = _not_editable_because(requests, tok, batch_targets)
        if reason is not None:
            log.warning("Skipping case %s: %s", case.case_id, reason)
            skipped.append(case.case_id)
            continue
        batch_targets.update((conflict_key(r), r.target_new) for r in requests)
        kept.append(case)
    return kept, skipped


def _not_editable_because(requests: list[EditRequest], tok: PreTrainedTokenizerBase, batch_targets: dict[tuple[str, str], str]) -> str | None:
    """Why a case's requests cannot join a batch whose earlier requests asked for ``batch_targets``; None if they can."""
    try:
        check_tokenization(requests, tok)
    except RequestError as err:
        return str(err).replace("request 0: ", "")
    for request in requests:
        earlier = batch_targets.get(conflict_key(request), request.target_new)
        if earlier != request.target_new:
            return f"{request.subject!r} in {request.prompt!r} asks for {request.target_new!r}, an earlier case of its batch for {earlier!r}"
    return None


def merged_subject_case_ids(cases: list[Case], tok: PreTrainedTokenizerBase) -> list:
    """Ids of the cases with a request whose subject ends inside a token: their edits are made
    at that token (the editor warns once per request), and a run records how many there were."""
    return [c.case_id for c in cases if any(t.merged for t in check_tokenization(list(case_requests(c)), tok))]


def _validate_batches(cases: list[Case], config: RunConfig) -> None:
    """Reject batches that cannot be edited before any time is spent (names the case)."""
    for group in in_groups(cases, config.num_edits):
        try:
            parse_requests([r for c in group for r in case_requests(c)])
        except RequestError as err:
            first = group[0].case_id
            raise RunError(f"the batch starting at case {first}: {err}") from None


def run_evaluation(
    config: RunConfig,
    model: PreTrainedModel | None = None,
    tok: PreTrainedTokenizerBase | None = None,
    hparams: HyperParams | None = None,
    options: EditOptions | None = None,
    hooks: RunHooks | None = None,
) -> Path:
    """Run (or continue) an evaluation and return its folder. ``model``/``tok`` default to
    ``load_model(config.model)``; the model is restored to its original weights at the end."""
    hooks = hooks or RunHooks()
    options = options or EditOptions()
    get_editor_class(config.alg)  # fail early on an unknown method
    run_dir, config = resolve_config(config)
    folder = data_dir(config.data_dir)
    dataset, path, cases = load_cases(config.dataset, config.data_file, folder)
    if model is None or tok is None:
        from memit.models import load_model

        model, tok = load_model(config.model, config.dtype, config.device, config.device_map, config.offload_folder)
    hparams = resolve_hparams(config.alg, hparams if hparams is not None else config.hparams, model)
    cases, skipped = editable_cases(cases, tok, config.limit, config.num_edits)
    _validate_batches(cases, config)
    config = dataclasses.replace(config, dataset=dataset, data_file=str(Path(path).resolve()))
    run_dir = start_run(run_dir, config, hparams, {
        "options": dataclasses.asdict(options), "model_name": getattr(model.config, "_name_or_path", ""),
        "skipped_case_ids": skipped, "merged_subject_case_ids": merged_subject_case_ids(cases, tok),
        "planned_cases": len(cases[:: config.score_interval]), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    if hooks.on_start:
        hooks.on_start(run_dir)
    # One editor for the whole run, so that what it derives from the statistics is reused.
    editor = get_editor_class(config.alg)(hparams, options)
    spec = _run_spec(config)
    scored = cases[:: config.score_interval]
    scoring = Scoring(
        fmt=prompt_format(tok, config.chat_template),
        generation_tokens=config.generation_tokens,
        answer_tokens=config.answer_limit,
        generation_cases=frozenset(c.case_id for c in scored[:: config.generation_interval]) if config.generation_interval > 1 else None,
    )
    if not config.skip_generation and any(has_generation(c, spec, scoring) for c in scored):
        scoring.generation = GenerationResources.load(folder, lambda: editor.corpus(model, tok))
    pre_cache = pre_cache_dir(config, model, scoring.generation is not None)
    group_size = config.num_edits * config.sequential_batches
    distributed.barrier()  # every process sees the same finished cases
    to_score = {c.case_id for c in scored if not case_file(run_dir, c).is_file()}
    todo = [g for g in in_groups(cases, group_size) if any(c.case_id in to_score for c in g)]
    log.info("%s: %d cases to score, %d already done, %d groups of up to %d edits to run",
             run_dir, len(scored), len(scored) - len(to_score), len(todo), group_size)
    for group in progress(todo, desc=f"evaluate {run_dir.name}", unit="groups", logger=log):
        _run_group(model, tok, editor, config, run_dir, group, [c for c in group if c.case_id in to_score], scoring, hooks, pre_cache)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(run_dir / ".deltas", ignore_errors=True)  # leftovers of groups finished before an interruption
    return run_dir


def _run_group(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    editor: Editor,
    config: RunConfig,
    run_dir: Path,
    group: list[Case],
    to_score: list[Case],
    scoring: Scoring,
    hooks: RunHooks,
    pre_cache: Path | None = None,
) -> None:
    """Pre metrics of the cases ``to_score``, the group's K sequential edits, post metrics, files,
    revert. In a torch.distributed group every process makes the edits and scores its share of
    the cases."""
    spec = _run_spec(config)
    pending = distributed.shard(to_score, heavy=lambda c: has_generation(c, spec, scoring))
    start = time.perf_counter()
    pre = _pre_metrics(model, tok, pending, scoring, config, pre_cache)
    pre_seconds = time.perf_counter() - start
    log.info("Unedited metrics of %d cases: %.0f s; editing %d cases", len(pending), pre_seconds, len(group))
    applied: list[WeightDeltas] = []
    keys: list[str] = []
    try:
        start = time.perf_counter()
        for k, batch in enumerate(in_groups(group, config.num_edits)):
            requests = batch_requests(batch)
            if config.reuse_edits:
                keys.append(edit_key(editor, model, requests, keys))
                folder = Path(config.out) / EDIT_CACHE / keys[-1]
            else:
                folder = deltas_dir(run_dir, group) / f"batch_{k}"
            applied.append(edit_or_reload(model, tok, editor, folder, batch, requests, applied, hooks.on_edit))
        edit_seconds = time.perf_counter() - start
        update = update_size(applied)
        # Of the edit time, what the target vectors took (near nothing when cached; the
        # scaling curve's cache saving is read from it).
        target_seconds = sum(d.timings.get("target_vectors", 0.0) for d in applied)
        log.info("Edited %d cases in %.0f s (update norm %.3g, %.3g of the weights'); scoring the edited model",
                 len(group), edit_seconds, update["norm"], update["relative"])
        scored = evaluate_cases(model, tok, pending, scoring, spec)
        for case, post, seconds in progress(scored, total=len(pending), desc="post-edit scoring", unit="cases", logger=log, leave=False):
            record = {
                "case_id": case.case_id,
                "num_edits": config.num_edits,
                "sequential_batches": config.sequential_batches,
                "grouped_case_ids": [c.case_id for c in group],
                **_rewrites(case),
                "prompt_format": scoring.fmt.name,
                "time": {"edit_seconds": edit_seconds, "target_seconds": target_seconds, "pre_seconds_group": pre_seconds,
                         "post_seconds": seconds},
                "update": update,
                "pre": pre[case.case_id],
                "post": post,
            }
            path = case_file(run_dir, case)
            write_json(path, record)
            if hooks.on_case_done:
                hooks.on_case_done(path)
    finally:
        for deltas in reversed(applied):
            deltas.revert(model)
    distributed.barrier()
    if distributed.is_main():
        shutil.rmtree(deltas_dir(run_dir, group), ignore_errors=True)


def _rewrites(case: Case) -> dict[str, Any]:
    """``requested_rewrite`` as the paper writes it; a case with several edits (MQuAKE)
    lists them all as ``requested_rewrites``."""
    requests = case_requests(case)
    if len(requests) == 1:
        return {"requested_rewrite": requests[0].to_dict()}
    return {"requested_rewrite": requests[0].to_dict(), "requested_rewrites": [r.to_dict() for r in requests]}


__all__ = ["RunConfig", "RunError", "RunHooks", "editable_cases", "merged_subject_case_ids", "pre_cache_dir", "run_evaluation"]
