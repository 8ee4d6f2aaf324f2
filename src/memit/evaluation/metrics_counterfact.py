"""CounterFact probability metrics, computed as the paper's code does.

Per prompt: the mean per-token NLL of ``target_new`` and ``target_true`` (teacher-forced)
and whether the model's argmax reproduces the whole expected target. Per case:
success = share of prompts where NLL(true) > NLL(new) (neighborhood: the reverse),
magnitude = mean of exp(-NLL(new)) - exp(-NLL(true)) (neighborhood: the reverse),
accuracy = share of prompts whose expected target is the argmax at every token.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.evaluation.answers import Probe
from memit.predict import score_continuations
from memit.prompt_format import RAW, PromptFormat

if TYPE_CHECKING:  # the data set modules import these metrics
    from memit.evaluation.datasets import CounterFactCase

# Prompt groups, and whether the true target (rather than the new one) should win.
GROUPS: dict[str, bool] = {"efficacy": False, "paraphrase": False, "neighborhood": True}


@dataclass
class PromptScore:
    """One prompt's scores: mean per-token NLLs and whether the expected target is the argmax."""

    prompt: str
    nll_new: float
    nll_true: float
    correct: bool


def group_prompts(case: CounterFactCase) -> dict[str, list[str]]:
    return {
        "efficacy": [case.request.filled_prompt()],
        "paraphrase": list(case.paraphrase_prompts),
        "neighborhood": list(case.neighborhood_prompts),
    }


def counterfact_probes(case: CounterFactCase) -> list[Probe]:
    """The rewrite and its paraphrases should now be answered with the new target; the
    neighborhood prompts still with the true one."""
    new, true = (case.request.target_new,), (case.request.target_true or "",)
    return [Probe(name, p, true if GROUPS[name] else new) for name, prompts in group_prompts(case).items() for p in prompts]


def counterfact_pairs(case: CounterFactCase, fmt: PromptFormat = RAW) -> list[tuple[str, str]]:
    """(prompt, continuation) for both targets after every prompt of the case, in group order."""
    prompts = [p for group in group_prompts(case).values() for p in group]
    targets = [t for t in (case.request.target_new, case.request.target_true) if t is not None]
    return [(fmt.prompt(p), fmt.continuation(t)) for p in prompts for t in targets]


def score_case(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    case: CounterFactCase,
    fmt: PromptFormat = RAW,
    batch_size: int = 32,
) -> dict[str, list[PromptScore]]:
    """NLLs of both targets after every prompt of the case, in one batched pass."""
    if case.request.target_true is None:
        raise ValueError(f"case {case.case_id}: CounterFact metrics need target_true")
    groups = group_prompts(case)
    flat = [(name, p) for name, prompts in groups.items() for p in prompts]
    pairs = counterfact_pairs(case, fmt)
    scores = score_continuations(model, tok, [p for p, _ in pairs], [c for _, c in pairs], batch_size=batch_size)
    out: dict[str, list[PromptScore]] = {name: [] for name in groups}
    for i, (name, prompt) in enumerate(flat):
        new, true = scores[2 * i], scores[2 * i + 1]
        expected = true if GROUPS[name] else new
        out[name].append(PromptScore(prompt, new.mean_nll, true.mean_nll, all(expected.argmax_matches)))
    return out


def success(scores: list[PromptScore], true_wins: bool) -> float:
    return _mean([(s.nll_true < s.nll_new) if true_wins else (s.nll_true > s.nll_new) for s in scores])


def magnitude(scores: list[PromptScore], true_wins: bool) -> float:
    diffs = [math.exp(-s.nll_new) - math.exp(-s.nll_true) for s in scores]
    return _mean([-d for d in diffs] if true_wins else diffs)


def accuracy(scores: list[PromptScore]) -> float:
    return _mean([s.correct for s in scores])


def summarize_case(scores: dict[str, list[PromptScore]]) -> dict[str, float | None]:
    """``<group>_success``, ``<group>_magnitude`` and ``<group>_acc`` for each group."""
    out: dict[str, float | None] = {}
    for name, true_wins in GROUPS.items():
        group = scores.get(name, [])
        out[f"{name}_success"] = success(group, true_wins) if group else None
        out[f"{name}_magnitude"] = magnitude(group, true_wins) if group else None
        out[f"{name}_acc"] = accuracy(group) if group else None
    return out


def evaluate_counterfact_case(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: CounterFactCase, fmt: PromptFormat = RAW, batch_size: int = 32
) -> dict:
    """Summary metrics plus the per-prompt scores, ready for JSON."""
    scores = score_case(model, tok, case, fmt, batch_size)
    return {**summarize_case(scores), "prompts": {name: [asdict(s) for s in group] for name, group in scores.items()}}


def _mean(values: list) -> float:
    return float(sum(values)) / len(values)


__all__ = ["GROUPS", "PromptScore", "accuracy", "counterfact_pairs", "counterfact_probes", "evaluate_counterfact_case", "magnitude", "score_case", "success", "summarize_case"]
