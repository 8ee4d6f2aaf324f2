"""zsRE (MEND's evaluation split): a question, its rephrase, the new answer ``alt`` and an
unrelated Natural Questions question with its answer.

zsRE metrics, computed as the paper's code does: teacher-forced top-1 accuracy of each
answer token (averaged over the answer's tokens) for the edit question (efficacy), its
rephrase (paraphrase) and the unrelated NQ question (specificity, ``loc`` + "?" followed
by " " + ``loc_ans``). Records in EasyEdit's format may carry a ``portability`` question
that needs the new fact to answer; it is scored the same way (``portability_acc``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.mend.train import TrainingExample
from memit.evaluation.answers import Probe
from memit.evaluation.datasets.base import DatasetError, DatasetSpec, RemoteFile
from memit.evaluation.datasets.fields import get_field, get_request, subject_template
from memit.predict import score_continuations
from memit.prompt_format import RAW, PromptFormat
from memit.requests import EditRequest


@dataclass(frozen=True)
class ZsreCase:
    """A zsRE case: the edit question, its rephrase and an unrelated NQ question."""

    case_id: int | str
    request: EditRequest
    rephrase: str
    loc: str
    loc_ans: str
    portability: tuple[str, str] | None = None  # (question, answer) that need the new fact


def parse_zsre(record: Any, index: int) -> ZsreCase:
    """A record of ``zsre_mend_eval.json``; the new target is ``alt``."""
    subject = get_field(record, index, "subject")
    prompt = subject_template(get_field(record, index, "src"), subject, index, "src")
    alt = get_field(record, index, "alt")
    request = get_request({"prompt": prompt, "subject": subject, "target_new": alt, "case_id": index}, index, "")
    loc = get_field(record, index, "loc")
    loc_ans = get_field(record, index, "loc_ans")
    if not loc_ans.strip():
        raise DatasetError(f"record {index}: field 'loc_ans' is empty")
    case_id = record.get("case_id", index)
    return ZsreCase(
        case_id=case_id if isinstance(case_id, (int, str)) else index,
        request=request,
        rephrase=get_field(record, index, "rephrase"),
        loc=loc,
        loc_ans=loc_ans,
        portability=_portability(record, index),
    )


def _portability(record: Any, index: int) -> tuple[str, str] | None:
    """EasyEdit's ``portability`` object (``New Question``, ``New Answer``), if present."""
    if record.get("portability") is None:
        return None
    portability = get_field(record, index, "portability", Mapping)
    try:
        question = get_field(portability, index, "New Question")
        answer = get_field(portability, index, "New Answer")
    except DatasetError as err:
        raise DatasetError(str(err).replace("field '", "field 'portability.")) from None
    if not question.strip() or not answer.strip():
        raise DatasetError(f"record {index}: field 'portability' has an empty question or answer")
    return question, answer


def zsre_training_example(case: ZsreCase) -> TrainingExample:
    """The question, its rephrase and the unrelated NQ question."""
    target = case.request.target_new
    return TrainingExample((case.request.filled_prompt(), target), (case.rephrase, target), case.loc)


# --- the metric ----------------------------------------------------------------------------

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


ZSRE = DatasetSpec(
    name="zsre",
    case_type=ZsreCase,
    parse=parse_zsre,
    metric=evaluate_zsre_case,
    probes=zsre_probes,
    scored_pairs=zsre_pairs,
    training_example=zsre_training_example,
    local_files=("zsre_mend_eval.json",),
    # The host publishes no checksum: the download records the sha256 it first gets (trust on first use).
    remote_files=(RemoteFile("zsre_mend_eval.json"),),
    detect_order=1,
    # The paper calls the unrelated question's accuracy specificity.
    labels={"neighborhood_acc": "Neighborhood acc (specificity)"},
)


__all__ = ["ZSRE", "ZsreCase", "evaluate_zsre_case", "parse_zsre", "zsre_pairs", "zsre_probes", "zsre_prompts", "zsre_training_example"]
