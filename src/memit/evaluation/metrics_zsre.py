"""zsRE metrics, computed as the paper's code does: teacher-forced top-1 accuracy of each
answer token (averaged over the answer's tokens) for the edit question (efficacy), its
rephrase (paraphrase) and the unrelated NQ question (specificity, ``loc`` + "?" followed
by " " + ``loc_ans``). Records in EasyEdit's format may carry a ``portability`` question
that needs the new fact to answer; it is scored the same way (``portability_acc``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.evaluation.answers import Probe
from memit.predict import score_continuations
from memit.prompt_format import RAW, PromptFormat

if TYPE_CHECKING:  # the data set modules import these metrics
    from memit.evaluation.datasets import ZsreCase


def zsre_prompts(case: ZsreCase) -> dict[str, tuple[str, str]]:
    """Group -> (prompt, expected continuation)."""
    groups = {
        "efficacy": (case.request.filled_prompt(), case.request.target_new),
        "paraphrase": (case.rephrase, case.request.target_new),
        "neighborhood": (case.loc + "?", " " + case.loc_ans.strip()),
    }
    if case.portability is not None:
        question, answer = case.portability
        groups["portability"] = (question, " " + answer.strip())
    return groups


def zsre_probes(case: ZsreCase) -> list[Probe]:
    return [Probe(name, prompt, (target,)) for name, (prompt, target) in zsre_prompts(case).items()]


def zsre_pairs(case: ZsreCase, fmt: PromptFormat = RAW) -> list[tuple[str, str]]:
    return [(fmt.prompt(p), fmt.continuation(t)) for p, t in zsre_prompts(case).values()]


def evaluate_zsre_case(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: ZsreCase, fmt: PromptFormat = RAW, batch_size: int = 32
) -> dict:
    """``<group>_acc`` (mean over answer tokens) and the per-token matches of each group."""
    groups = zsre_prompts(case)
    pairs = zsre_pairs(case, fmt)
    scores = score_continuations(model, tok, [p for p, _ in pairs], [c for _, c in pairs], batch_size)
    out: dict = {}
    for name, score in zip(groups, scores):
        out[f"{name}_acc"] = sum(score.argmax_matches) / len(score.argmax_matches)
    out["prompts"] = {
        name: {"prompt": prompt, "target": target, "token_correct": score.argmax_matches}
        for (name, (prompt, target)), score in zip(groups.items(), scores)
    }
    return out


__all__ = ["evaluate_zsre_case", "zsre_pairs", "zsre_probes", "zsre_prompts"]
