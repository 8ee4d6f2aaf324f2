"""zsRE metrics, computed as the paper's code does: teacher-forced top-1 accuracy of each
answer token (averaged over the answer's tokens) for the edit question (efficacy), its
rephrase (paraphrase) and the unrelated NQ question (specificity, ``loc`` + "?" followed
by " " + ``loc_ans``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.predict import score_continuations

if TYPE_CHECKING:  # the data set modules import these metrics
    from memit.evaluation.datasets import ZsreCase


def zsre_prompts(case: ZsreCase) -> dict[str, tuple[str, str]]:
    """Group -> (prompt, expected continuation)."""
    return {
        "efficacy": (case.request.filled_prompt(), case.request.target_new),
        "paraphrase": (case.rephrase, case.request.target_new),
        "neighborhood": (case.loc + "?", " " + case.loc_ans.strip()),
    }


def evaluate_zsre_case(model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: ZsreCase, batch_size: int = 32) -> dict:
    """``<group>_acc`` (mean over answer tokens) and the per-token matches of each group."""
    groups = zsre_prompts(case)
    scores = score_continuations(model, tok, [p for p, _ in groups.values()], [c for _, c in groups.values()], batch_size)
    out: dict = {}
    for (name, (prompt, target)), score in zip(groups.items(), scores):
        out[f"{name}_acc"] = sum(score.argmax_matches) / len(score.argmax_matches)
    out["prompts"] = {
        name: {"prompt": prompt, "target": target, "token_correct": score.argmax_matches}
        for (name, (prompt, target)), score in zip(groups.items(), scores)
    }
    return out


__all__ = ["evaluate_zsre_case", "zsre_prompts"]
