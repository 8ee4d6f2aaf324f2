"""MQuAKE metrics. Teacher-forced, per case (as CounterFact compares two targets):

- ``efficacy_success``: share of the case's edits whose cloze statement now prefers the new
  target to the true one (lower mean per-token NLL);
- ``paraphrase_success``: the same after each edit's question;
- ``multihop_success``: 1 if after any of the three phrasings of the multi-hop question the
  new answer is preferred to the old one (MQuAKE's "any of three" rule).

The generated-answer metrics judge greedy answers to the same prompts: ``gen_multihop``
accepts the new answer or any of its aliases.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.evaluation.answers import Probe
from memit.predict import score_continuations
from memit.prompt_format import RAW, PromptFormat

if TYPE_CHECKING:  # the data set module imports these metrics
    from memit.evaluation.datasets.mquake import MquakeCase

MULTIHOP = "multihop"


def _pairs(case: MquakeCase) -> dict[str, list[tuple[str, str, str]]]:
    """Group -> (prompt, new answer, old answer) for each prompt."""
    edits = [(r.filled_prompt(), r.target_new, r.target_true or "") for r in case.requests]
    questions = [(q, r.target_new, r.target_true or "") for q, r in zip(case.edit_questions, case.requests)]
    multihop = [(q, " " + case.new_answer.strip(), " " + case.answer.strip()) for q in case.questions]
    return {"efficacy": edits, "paraphrase": questions, MULTIHOP: multihop}


def mquake_probes(case: MquakeCase) -> list[Probe]:
    new_answers = (case.new_answer, *case.new_answer_aliases)
    return [
        Probe(group, prompt, new_answers if group == MULTIHOP else (new,))
        for group, rows in _pairs(case).items()
        for prompt, new, _ in rows
    ]


def evaluate_mquake_case(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: MquakeCase, fmt: PromptFormat = RAW, batch_size: int = 32
) -> dict:
    groups = _pairs(case)
    flat = [(group, prompt, target) for group, rows in groups.items() for prompt, new, old in rows for target in (new, old)]
    scores = score_continuations(
        model, tok, [fmt.prompt(p) for _, p, _ in flat], [fmt.continuation(t) for _, _, t in flat], batch_size
    )
    out: dict = {"prompts": {}}
    for group in groups:
        rows = [(prompt, new.mean_nll, old.mean_nll) for (g, prompt, _), new, old in zip(flat[::2], scores[::2], scores[1::2]) if g == group]
        wins = [nll_new < nll_old for _, nll_new, nll_old in rows]
        key = "multihop_success" if group == MULTIHOP else f"{group}_success"
        out[key] = float(any(wins)) if group == MULTIHOP else sum(wins) / len(wins)
        out["prompts"][group] = [{"prompt": p, "nll_new": n, "nll_old": o} for p, n, o in rows]
    return out


__all__ = ["MULTIHOP", "evaluate_mquake_case", "mquake_probes"]
