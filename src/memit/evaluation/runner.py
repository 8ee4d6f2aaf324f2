"""Evaluation runs: edit ``num_edits`` cases at a time, score every case before and after,
and write one JSON per case into ``<out>/<ALG>/run_<NNN>/`` (atomically, so a killed run
never leaves a half-written case file). A run continued later skips finished cases."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.editing.base import EditOptions, Editor
from memit.editing.hparams import HyperParams
from memit.editing.methods import get_editor_class, resolve_hparams
from memit.errors import InputError
from memit.evaluation.answers import DEFAULT_ANSWER_TOKENS, answer_metrics, generate_answers, judge
from memit.evaluation.datasets import (
    DEFAULT_DATASET,
    Case,
    CounterFactCase,
    DatasetSpec,
    data_dir,
    dataset_of,
    get_dataset,
    load_cases,
)
from memit.evaluation.datasets.base import case_requests
from memit.evaluation.generation import (
    Snippets,
    TfidfModel,
    consistency,
    fluency,
    generate_greedy,
    load_snippets,
    load_tfidf,
)
from memit.predict import prefetched_scores
from memit.prompt_format import RAW, PromptFormat, prompt_format
from memit.requests import EditRequest, RequestError, check_tokenization, conflict_key, parse_requests
from memit.stats.corpus import Corpus
from memit.utils import distributed
from memit.utils.io import read_json, write_json
from memit.utils.paths import child_path, path_component
from memit.utils.progress import progress

log = logging.getLogger(__name__)

PARAMS_FILE = "params.json"
EDIT_CACHE = ".edit_cache"
_RUN = re.compile(r"run_(\d+)$")
# Cases evaluated together: their answers decoded in shared batches, their teacher-forced
# prompts scored in batches of similar length (48 CounterFact cases, about 620 prompts, make
# batches of one or two lengths; 12 ran 14% slower on a CPU).
CASES_PER_CHUNK = 48
# Texts for fluency are decoded for up to this many prompts at once, gathered from up to
# MAX_CASES_PER_TEXT_CHUNK cases: with fluency on every 10th case, a 48-case chunk holds 10
# prompts, and a step of 10 rows cost 0.18 s against 0.62 s for 128 on one thread.
GENERATION_BATCH = 128
MAX_CASES_PER_TEXT_CHUNK = 16 * CASES_PER_CHUNK
# Parameters that must agree for a run to be continued.
RUN_IDENTITY = (
    "alg", "model", "dtype", "dataset", "data_file", "num_edits", "sequential_batches", "limit",
    "chat_template", "skip_generation", "generation_tokens", "generation_interval", "generated_answers", "answer_tokens",
)


class RunError(InputError):
    """A run cannot be started or continued as asked."""


@dataclass
class RunConfig:
    """What to evaluate; stored as ``params.json`` in the run folder."""

    alg: str = "MEMIT"
    model: str = "default"
    dataset: str | None = DEFAULT_DATASET
    data_file: str | None = None
    data_dir: str | None = None
    num_edits: int = 1
    sequential_batches: int = 1
    limit: int | None = None
    hparams: str | None = None
    # How the model is loaded (see memit.load_model).
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    offload_folder: str | None = None
    # Prompts as a user turn of the model's chat template instead of as written.
    chat_template: bool = False
    # The paper's 100-token fluency and consistency generations.
    skip_generation: bool = False
    generation_tokens: int = 100
    # Fluency and consistency on every N-th case only (the paper's generation_test_interval).
    generation_interval: int = 1
    # Short greedy answers judged against the targets (the gen_* metrics).
    generated_answers: bool = True
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    # Keep each batch's weight changes under <out>/.edit_cache and reuse them in any run that
    # makes the same edit (e.g. the same edits scored with and without the chat template).
    reuse_edits: bool = False
    out: str = "results"
    continue_from_run: str | None = None

    @property
    def answer_limit(self) -> int | None:
        """Tokens per generated answer; None when generated answers are off."""
        return self.answer_tokens if self.generated_answers else None

    def __post_init__(self) -> None:
        if self.num_edits < 1:
            raise RunError(f"num_edits: must be at least 1, got {self.num_edits}")
        if self.sequential_batches < 1:
            raise RunError(f"sequential_batches: must be at least 1, got {self.sequential_batches}")
        if self.generation_interval < 1:
            raise RunError(f"generation_interval: must be at least 1, got {self.generation_interval}")
        if self.limit is not None and self.limit < 1:
            raise RunError(f"limit: must be at least 1, got {self.limit}")
        if self.answer_tokens < 1:
            raise RunError(f"answer_tokens: must be at least 1, got {self.answer_tokens}")


@dataclass
class GenerationResources:
    """Snippets and TF-IDF vectorizer for the consistency metric (either may be missing)."""

    snippets: Snippets | None = None
    tfidf: TfidfModel | None = None

    @classmethod
    def load(cls, folder: Path, corpus: Callable[[], Corpus]) -> "GenerationResources":
        """``corpus`` is asked for only when the paper's TF-IDF files are missing."""
        snippets = load_snippets(folder)
        if snippets is None:
            log.warning("No %s in %s: consistency is skipped (fluency is still computed)", "attribute_snippets.json", folder)
            return cls()
        return cls(snippets, load_tfidf(folder, corpus))


@dataclass
class Scoring:
    """How cases are scored: the prompt format, the paper's generation metrics (None skips
    them) and the generated answers (``answer_tokens`` None skips them)."""

    fmt: PromptFormat = RAW
    generation: GenerationResources | None = None
    generation_tokens: int = 100
    answer_tokens: int | None = DEFAULT_ANSWER_TOKENS
    # Ids of the cases that get the generation metrics; None: every case.
    generation_cases: frozenset | None = None


@dataclass
class RunHooks:
    """Callbacks for progress and tests: after each written case, and around each edit."""

    on_case_done: Callable[[Path], None] | None = None
    on_edit: Callable[[list[Case]], None] | None = None
    on_start: Callable[[Path], None] | None = None  # the run folder, before any case is edited


# --- run folders --------------------------------------------------------------------------


def run_root(out: str | Path, alg: str) -> Path:
    return child_path(out, path_component(alg))


def new_run_dir(out: str | Path, alg: str) -> Path:
    """Create ``<out>/<alg>/run_<NNN>`` with the next free number."""
    root = run_root(out, alg)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        numbers = [int(m.group(1)) for p in root.iterdir() if (m := _RUN.match(p.name))]
        candidate = root / f"run_{max(numbers, default=-1) + 1:03d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def resolve_run_dir(out: str | Path, alg: str, run: str) -> Path:
    """``run`` as a path, ``run_003`` or ``3`` under ``<out>/<alg>``; it must hold params.json."""
    candidates = [Path(run), run_root(out, alg) / run]
    if run.isdigit():
        candidates.append(run_root(out, alg) / f"run_{int(run):03d}")
    for path in candidates:
        if (path / PARAMS_FILE).is_file():
            return path
    raise RunError(f"continue_from_run: no run {run!r} with a {PARAMS_FILE} (looked in {', '.join(map(str, candidates))})")


def case_file(run_dir: Path, case: Case) -> Path:
    """The case's result file; its id comes from a data file, so it is encoded to stay in ``run_dir``."""
    return child_path(run_dir, f"case_{path_component(case.case_id)}.json")


def list_runs(out: str | Path, alg: str) -> list[Path]:
    root = run_root(out, alg)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _RUN.match(p.name) and (p / PARAMS_FILE).is_file())


# --- evaluation of one case -------------------------------------------------------------------


def evaluate_case(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    case: Case,
    scoring: Scoring | None = None,
    spec: DatasetSpec | None = None,
    texts: list[str] | None = None,
    answers: list[str] | None = None,
) -> dict[str, Any]:
    """All metrics of ``case`` of data set ``spec`` (default: the first with cases of its
    type) on the model as it is now; ``texts`` and ``answers`` are its generated texts and
    answers if already computed."""
    scoring = scoring or Scoring()
    spec = spec or dataset_of(case)
    metrics = spec.evaluate_case(model, tok, case, scoring.fmt)
    if scoring.answer_tokens is not None and spec.probes is not None:
        probes = spec.probes(case)
        if answers is None:
            answers = generate_answers(model, tok, [scoring.fmt.prompt(p.prompt) for p in probes], scoring.answer_tokens)
        metrics.update(answer_metrics(judge(probes, answers), spec.any_groups))
    if scoring.generation is not None and _has_generation(case, spec, scoring):
        if texts is None:
            texts = generate_greedy(model, tok, case.generation_prompts, max_new_tokens=scoring.generation_tokens)
        metrics.update(generation_metrics(case, texts, scoring.generation))
    return metrics


def evaluate_cases(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    cases: list[Case],
    scoring: Scoring | None = None,
    spec: DatasetSpec | None = None,
) -> Iterator[tuple[Case, dict[str, Any], float]]:
    """(case, metrics, seconds) for each case, decoding the texts and answers of several
    cases in one batch (on a CPU a decoding step reads every weight, whether for 10 prompts
    or 128), and scoring their teacher-forced prompts in shared batches. The model must not
    change while the iterator runs: texts are generated ahead for up to a batch of them."""
    scoring = scoring or Scoring()
    for text_chunk in _text_chunks(cases, scoring, spec):
        start = time.perf_counter()
        texts = _generated_texts(model, tok, text_chunk, scoring, spec)
        text_seconds = (time.perf_counter() - start) / len(text_chunk)
        for chunk in _groups(text_chunk, CASES_PER_CHUNK):
            yield from _score_chunk(model, tok, chunk, texts, text_seconds, scoring, spec)


def _score_chunk(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, chunk: list[Case], texts: dict[Any, list[str]], text_seconds: float,
    scoring: Scoring, spec: DatasetSpec | None,
) -> list[tuple[Case, dict[str, Any], float]]:
    """(case, metrics, seconds) for one chunk: its answers decoded and its teacher-forced
    prompts scored together; ``text_seconds`` is each case's share of decoding its texts."""
    start = time.perf_counter()
    answers = _generated_answers(model, tok, chunk, scoring, spec)
    chunk_spec = spec or dataset_of(chunk[0])
    pairs = [pair for c in chunk for pair in chunk_spec.scored_pairs(c, scoring.fmt)] if chunk_spec.scored_pairs else []
    done = []
    with prefetched_scores(model, tok, list(dict.fromkeys(pairs))):
        shared = text_seconds + (time.perf_counter() - start) / len(chunk)
        for case in chunk:
            start = time.perf_counter()
            metrics = evaluate_case(model, tok, case, scoring, spec, texts.get(case.case_id), answers.get(case.case_id))
            done.append((case, metrics, shared + time.perf_counter() - start))
    return done


def _text_chunks(cases: list[Case], scoring: Scoring, spec: DatasetSpec | None) -> Iterator[list[Case]]:
    """Runs of cases whose generation prompts fill one decoding batch, so that with
    ``generation_interval`` N the 100-token decode runs on full batches, not on the few
    texts of each chunk of answers (at most ``MAX_CASES_PER_TEXT_CHUNK`` cases a run)."""
    run: list[Case] = []
    prompts = 0
    for case in cases:
        n = len(case.generation_prompts) if scoring.generation is not None and _has_generation(case, spec, scoring) else 0
        if run and (prompts + n > GENERATION_BATCH or len(run) >= MAX_CASES_PER_TEXT_CHUNK):
            yield run
            run, prompts = [], 0
        run.append(case)
        prompts += n
    if run:
        yield run


def _has_generation(case: Any, spec: DatasetSpec | None = None, scoring: Scoring | None = None) -> bool:
    chosen = scoring is None or scoring.generation_cases is None or case.case_id in scoring.generation_cases
    return chosen and (spec or dataset_of(case)).has_generation and bool(case.generation_prompts)


def _split(cases: list[Case], per_case: list[list[Any]], outputs: list[Any]) -> dict[Any, list[Any]]:
    """``outputs`` of the concatenated ``per_case`` inputs, cut back into one list per case."""
    out: dict[Any, list[Any]] = {}
    for case, inputs in zip(cases, per_case):
        out[case.case_id], outputs = outputs[: len(inputs)], outputs[len(inputs) :]
    return out


def _generated_texts(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: list[Case], scoring: Scoring, spec: DatasetSpec | None
) -> dict[Any, list[str]]:
    if scoring.generation is None:
        return {}
    prompted: list[Any] = [c for c in cases if _has_generation(c, spec, scoring)]
    prompts = [c.generation_prompts for c in prompted]
    texts = generate_greedy(model, tok, [p for ps in prompts for p in ps], scoring.generation_tokens, batch_size=GENERATION_BATCH)
    return _split(prompted, prompts, texts)


def _generated_answers(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: list[Case], scoring: Scoring, spec: DatasetSpec | None
) -> dict[Any, list[str]]:
    spec = spec or (dataset_of(cases[0]) if cases else None)
    if scoring.answer_tokens is None or spec is None or spec.probes is None:
        return {}
    prompts = [[scoring.fmt.prompt(p.prompt) for p in spec.probes(c)] for c in cases]
    answers = generate_answers(model, tok, [p for ps in prompts for p in ps], scoring.answer_tokens)
    return _split(cases, prompts, answers)


def generation_metrics(case: CounterFactCase, texts: list[str], res: GenerationResources) -> dict[str, Any]:
    out: dict[str, Any] = {"fluency": fluency(texts), "consistency": None, "consistency_tfidf": None, "generated_texts": texts}
    snippet_texts: list[str] = []
    if res.snippets is not None and case.relation_id and case.target_new_id:
        snippet_texts = [s["text"] for s in res.snippets.get(case.relation_id, {}).get(case.target_new_id, [])]
    if snippet_texts and res.tfidf is not None:
        out["consistency"] = consistency(texts, snippet_texts, res.tfidf)
        out["consistency_tfidf"] = res.tfidf.source
    return out


# --- the run ------------------------------------------------------------------------------------


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


def _groups(cases: list[Case], size: int) -> list[list[Case]]:
    return [cases[i : i + size] for i in range(0, len(cases), size)]


def editable_cases(cases: list[Case], tok: PreTrainedTokenizerBase, limit: int | None, batch_size: int | None = None) -> tuple[list[Case], list]:
    """The first ``limit`` cases that can be edited in batches of ``batch_size`` (None: one
    batch), and the ids of those skipped: a subject that no token of the prompt covers, or a
    request that contradicts one earlier in its batch (the same subject and prompt, another
    target; the paper's MultiCounterFact drops such conflicts, and a batch cannot hold both).
    A subject whose last characters the tokenizer merges with what follows (")?" in
    "(APA-56)?") is kept and edited at that token, as in the paper's code
    (:func:`merged_subject_case_ids` counts those)."""
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
    for group in _groups(cases, config.num_edits):
        try:
            parse_requests([r for c in group for r in case_requests(c)])
        except RequestError as err:
            first = group[0].case_id
            raise RunError(f"the batch starting at case {first}: {err}") from None


def hparams_json(hparams: HyperParams) -> dict[str, Any]:
    """Hyperparameters as they read back from params.json (tuples become lists)."""
    return json.loads(json.dumps(hparams.to_dict()))


def _stored_params(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / PARAMS_FILE, what="run parameters")


def resolve_config(config: RunConfig) -> tuple[Path | None, RunConfig]:
    """The run folder to continue (None for a new run) and the configuration to use: a
    continued run keeps the parameters it was started with."""
    if config.continue_from_run is None:
        return None, config
    run_dir = resolve_run_dir(config.out, config.alg, config.continue_from_run)
    stored_config = _stored_params(run_dir).get("config", {})
    for key in RUN_IDENTITY:
        given = getattr(config, key)
        if key == "data_file" and given is not None:  # stored resolved
            given = str(Path(given).resolve())
        if key in stored_config and stored_config[key] != given:
            log.warning("Continuing %s with its stored %s=%r (not %r)", run_dir, key, stored_config[key], getattr(config, key))
    return run_dir, dataclasses.replace(config, **{k: stored_config[k] for k in RUN_IDENTITY if k in stored_config})


def start_run(run_dir: Path | None, config: RunConfig, hparams: HyperParams, extra: dict[str, Any]) -> Path:
    """Create a new run folder with params.json, or check a continued run's hyperparameters."""
    if run_dir is None:
        if distributed.is_main():
            run_dir = new_run_dir(config.out, config.alg)
            write_json(run_dir / PARAMS_FILE, {"config": dataclasses.asdict(config), "hparams": hparams.to_dict(), **extra})
        return distributed.broadcast(run_dir)
    if _stored_params(run_dir).get("hparams") != hparams_json(hparams):
        raise RunError(f"continue_from_run: {run_dir} was run with other hyperparameters; start a new run")
    return run_dir


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
        "planned_cases": len(cases), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    if hooks.on_start:
        hooks.on_start(run_dir)
    # One editor for the whole run, so that what it derives from the statistics is reused.
    editor = get_editor_class(config.alg)(hparams, options)
    spec = _run_spec(config)
    scoring = Scoring(
        fmt=prompt_format(tok, config.chat_template),
        generation_tokens=config.generation_tokens,
        answer_tokens=config.answer_limit,
        generation_cases=frozenset(c.case_id for c in cases[:: config.generation_interval]) if config.generation_interval > 1 else None,
    )
    if not config.skip_generation and any(_has_generation(c, spec, scoring) for c in cases):
        scoring.generation = GenerationResources.load(folder, lambda: editor.corpus(model, tok))
    pre_cache = pre_cache_dir(config, model, scoring.generation is not None)
    group_size = config.num_edits * config.sequential_batches
    distributed.barrier()  # every process sees the same finished cases
    todo = [g for g in _groups(cases, group_size) if any(not case_file(run_dir, c).is_file() for c in g)]
    log.info("%s: %d cases, %d already done, %d groups of up to %d edits to run",
             run_dir, len(cases), sum(case_file(run_dir, c).is_file() for c in cases), len(todo), group_size)
    for group in progress(todo, desc=f"evaluate {run_dir.name}", unit="groups", logger=log):
        _run_group(model, tok, editor, config, run_dir, group, scoring, hooks, pre_cache)
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
    scoring: Scoring,
    hooks: RunHooks,
    pre_cache: Path | None = None,
) -> None:
    """Pre metrics of the unfinished cases, K sequential edits, post metrics, files, revert.
    In a torch.distributed group every process makes the edits and scores its share of the cases."""
    spec = _run_spec(config)
    pending = distributed.shard([c for c in group if not case_file(run_dir, c).is_file()], heavy=lambda c: _has_generation(c, spec, scoring))
    start = time.perf_counter()
    pre = _pre_metrics(model, tok, pending, scoring, config, pre_cache)
    pre_seconds = time.perf_counter() - start
    log.info("Unedited metrics of %d cases: %.0f s; editing %d cases", len(pending), pre_seconds, len(group))
    applied: list[WeightDeltas] = []
    keys: list[str] = []
    try:
        start = time.perf_counter()
        for k, batch in enumerate(_groups(group, config.num_edits)):
            requests = batch_requests(batch)
            if config.reuse_edits:
                keys.append(edit_key(editor, model, requests, keys))
                folder = Path(config.out) / EDIT_CACHE / keys[-1]
            else:
                folder = _deltas_dir(run_dir, group) / f"batch_{k}"
            applied.append(_edit_or_reload(model, tok, editor, folder, batch, requests, applied, hooks))
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
        shutil.rmtree(_deltas_dir(run_dir, group), ignore_errors=True)


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


def _rewrites(case: Case) -> dict[str, Any]:
    """``requested_rewrite`` as the paper writes it; a case with several edits (MQuAKE)
    lists them all as ``requested_rewrites``."""
    requests = case_requests(case)
    if len(requests) == 1:
        return {"requested_rewrite": requests[0].to_dict()}
    return {"requested_rewrite": requests[0].to_dict(), "requested_rewrites": [r.to_dict() for r in requests]}


def batch_requests(batch: list[Case]) -> list[EditRequest]:
    """The edits of a batch; one fact asked for by several cases (MQuAKE chains share
    edits) is edited once."""
    unique: dict[tuple[str, str, str], EditRequest] = {}
    for request in (r for c in batch for r in case_requests(c)):
        unique.setdefault((request.prompt, request.subject, request.target_new), request)
    return list(unique.values())


def _deltas_dir(run_dir: Path, group: list[Case]) -> Path:
    return child_path(run_dir / ".deltas", f"group_{path_component(group[0].case_id)}")


def edit_key(editor: Editor, model: PreTrainedModel, requests: list[EditRequest], earlier: list[str]) -> str:
    """What an edit depends on: method, hyperparameters, base model, options that change the
    result, the requests and the keys of the batches applied before (sequential editing)."""
    from memit.models.loading import model_fingerprint

    options = {k: v for k, v in dataclasses.asdict(editor.options).items() if k not in ("stats_dir", "stats_batch_tokens")}
    payload = {
        "alg": editor.name, "hparams": hparams_json(editor.hparams), "model": model_fingerprint(model), "dtype": str(model.dtype),
        "options": options, "requests": [r.to_dict() for r in requests], "earlier": earlier,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _edit_or_reload(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    editor: Editor,
    folder: Path,
    batch: list[Case],
    requests: list[EditRequest],
    earlier: list[WeightDeltas],
    hooks: RunHooks,
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
    if hooks.on_edit:
        hooks.on_edit(batch)
    deltas = editor.edit(model, tok, requests, earlier)
    if distributed.is_main():
        deltas.save(folder)
    distributed.barrier()
    return deltas


__all__ = [
    "GenerationResources",
    "RunConfig",
    "RunError",
    "RunHooks",
    "Scoring",
    "case_file",
    "evaluate_case",
    "evaluate_cases",
    "list_runs",
    "new_run_dir",
    "resolve_run_dir",
    "run_evaluation",
]
