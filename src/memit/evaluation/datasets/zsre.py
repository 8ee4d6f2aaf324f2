"""zsRE (MEND's evaluation split): a question, its rephrase, the new answer ``alt`` and an
unrelated Natural Questions question with its answer."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memit.editing.mend.train import TrainingExample
from memit.evaluation.datasets.base import DatasetError, DatasetSpec, RemoteFile
from memit.evaluation.datasets.fields import get_field, get_request, subject_template
from memit.evaluation.metrics_zsre import evaluate_zsre_case, zsre_pairs, zsre_probes
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


__all__ = ["ZSRE", "ZsreCase", "parse_zsre", "zsre_training_example"]
