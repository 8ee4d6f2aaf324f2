"""Scoring cases on the model as it is: a data set's teacher-forced metric, the generated
answers and the paper's fluency and consistency, with the texts and answers of many cases
decoded in shared batches."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.evaluation.answers import DEFAULT_ANSWER_TOKENS, answer_metrics, generate_answers, judge
from memit.evaluation.datasets import Case, CounterFactCase, DatasetSpec, dataset_of
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
from memit.prompt_format import RAW, PromptFormat
from memit.stats.corpus import Corpus

log = logging.getLogger(__name__)

# Cases evaluated together: their answers decoded in shared batches, their teacher-forced
# prompts scored in batches of similar length (48 CounterFact cases, about 620 prompts, make
# batches of one or two lengths; 12 ran 14% slower on a CPU).
CASES_PER_CHUNK = 48


# Texts for fluency are decoded for up to this many prompts at once, gathered from up to
# MAX_CASES_PER_TEXT_CHUNK cases: with fluency on every 10th case, a 48-case chunk holds 10
# prompts, and a step of 10 rows cost 0.18 s against 0.62 s for 128 on one thread.
GENERATION_BATCH = 128


MAX_CASES_PER_TEXT_CHUNK = 16 * CASES_PER_CHUNK


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
    if scoring.generation is not None and has_generation(case, spec, scoring):
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
        for chunk in in_groups(text_chunk, CASES_PER_CHUNK):
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
        n = len(case.generation_prompts) if scoring.generation is not None and has_generation(case, spec, scoring) else 0
        if run and (prompts + n > GENERATION_BATCH or len(run) >= MAX_CASES_PER_TEXT_CHUNK):
            yield run
            run, prompts = [], 0
        run.append(case)
        prompts += n
    if run:
        yield run


def has_generation(case: Any, spec: DatasetSpec | None = None, scoring: Scoring | None = None) -> bool:
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
    prompted: list[Any] = [c for c in cases if has_generation(c, spec, scoring)]
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


def in_groups(cases: list[Case], size: int) -> list[list[Case]]:
    return [cases[i : i + size] for i in range(0, len(cases), size)]


__all__ = ["CASES_PER_CHUNK", "GenerationResources", "Scoring", "evaluate_case", "evaluate_cases", "generation_metrics", "has_generation", "in_groups"]
