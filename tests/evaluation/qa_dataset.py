"""A tiny example data set, written as a real data set family would be: its case class,
record parser, metric, MEND training example and its one description ``QA``. Registering
``QA`` is all the rest of memit needs (see test_dataset_registry.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.mend.train import TrainingExample
from memit.evaluation.datasets import DatasetSpec, RemoteFile
from memit.evaluation.datasets.fields import get_field, get_request, subject_template
from memit.predict import score_continuations
from memit.prompt_format import PromptFormat
from memit.requests import EditRequest

UNRELATED = "The capital of France is"


@dataclass(frozen=True)
class QaCase:
    case_id: int | str
    request: EditRequest


def parse_qa(record: Any, index: int) -> QaCase:
    """``{"subject", "prompt" (holding the subject), "answer", "new_answer"}``."""
    subject = get_field(record, index, "subject")
    prompt = subject_template(get_field(record, index, "prompt"), subject, index, "prompt")
    raw = {
        "prompt": prompt,
        "subject": subject,
        "target_new": get_field(record, index, "new_answer"),
        "target_true": get_field(record, index, "answer"),
        "case_id": index,
    }
    return QaCase(index, get_request(raw, index, ""))


def evaluate_qa_case(model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: QaCase, fmt: PromptFormat) -> dict:
    prompt = fmt.prompt(case.request.filled_prompt())
    targets = [fmt.continuation(case.request.target_new), fmt.continuation(case.request.target_true)]
    new, true = score_continuations(model, tok, [prompt, prompt], targets)
    return {
        "efficacy_success": float(true.mean_nll > new.mean_nll),
        "efficacy_acc": float(all(new.argmax_matches)),
        "qa_nll": {"new": new.mean_nll, "true": true.mean_nll},
    }


def qa_training_example(case: QaCase) -> TrainingExample:
    edit = (case.request.filled_prompt(), case.request.target_new)
    return TrainingExample(edit, edit, UNRELATED)


QA = DatasetSpec(
    name="qa",
    case_type=QaCase,
    parse=parse_qa,
    metric=evaluate_qa_case,
    training_example=qa_training_example,
    local_files=("qa.json",),
    remote_files=(RemoteFile("qa.json"),),
    detect_order=3,
    labels={"efficacy_success": "Answer flipped"},
)
