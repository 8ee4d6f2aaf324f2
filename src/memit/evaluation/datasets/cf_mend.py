"""The reduced CounterFact files of MEND/EasyEdit: one rephrase and one locality prompt per
record, the subject written into ``prompt``; not downloadable from the paper's host.

The files have no generation prompts; fluency is measured on generations from the edit prompt
and the rephrase (most rephrases are one of the original generation prompts). Consistency
needs relation and target ids, which the files lack, so it is not measured."""
from __future__ import annotations

from typing import Any

from memit.evaluation.datasets.base import DatasetSpec
from memit.evaluation.datasets.counterfact import (
    CounterFactCase,
    counterfact_pairs,
    counterfact_probes,
    counterfact_training_example,
    evaluate_counterfact_case,
)
from memit.evaluation.datasets.fields import get_field, get_request, subject_template


def parse_cf_mend(record: Any, index: int) -> CounterFactCase:
    """A row of the reduced MEND/EasyEdit CounterFact files (subject filled into ``prompt``)."""
    subject = get_field(record, index, "subject")
    prompt = subject_template(get_field(record, index, "prompt"), subject, index, "prompt")
    case_id = get_field(record, index, "case_id", (int, str))
    raw = {
        "prompt": prompt,
        "subject": subject,
        "target_new": get_field(record, index, "target_new"),
        "target_true": get_field(record, index, "ground_truth"),
        "case_id": case_id,
    }
    return CounterFactCase(
        case_id=case_id,
        request=get_request(raw, index, ""),
        paraphrase_prompts=[get_field(record, index, "rephrase_prompt")],
        neighborhood_prompts=[get_field(record, index, "locality_prompt")],
        generation_prompts=[prompt.replace("{}", subject, 1), get_field(record, index, "rephrase_prompt")],
    )


CF_MEND = DatasetSpec(
    name="cf-mend",
    case_type=CounterFactCase,
    parse=parse_cf_mend,
    metric=evaluate_counterfact_case,
    probes=counterfact_probes,
    scored_pairs=counterfact_pairs,
    training_example=counterfact_training_example,
    has_generation=True,
    local_files=("counterfact-edit.json", "counterfact_mend/counterfact-edit.json"),
    detect_order=2,
)


__all__ = ["CF_MEND", "parse_cf_mend"]
