"""CounterFact and MultiCounterFact: a counterfactual rewrite with paraphrase, neighborhood
and generation prompts per record."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memit.editing.mend.train import TrainingExample
from memit.evaluation.datasets.base import DatasetError, DatasetSpec, RemoteFile
from memit.evaluation.datasets.fields import get_field, get_request, get_strings
from memit.evaluation.metrics_counterfact import counterfact_pairs, counterfact_probes, evaluate_counterfact_case
from memit.requests import EditRequest


@dataclass(frozen=True)
class CounterFactCase:
    """A CounterFact-style case (also MultiCounterFact and the reduced MEND schema)."""

    case_id: int | str
    request: EditRequest
    paraphrase_prompts: list[str]
    neighborhood_prompts: list[str]
    generation_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    relation_id: str | None = None
    target_new_id: str | None = None


def parse_counterfact(record: Any, index: int) -> CounterFactCase:
    """A record of ``counterfact.json`` / ``multi_counterfact.json``."""
    rewrite = get_field(record, index, "requested_rewrite", Mapping)
    if "target_true" not in rewrite:
        raise DatasetError(f"record {index}: missing field 'requested_rewrite.target_true'")
    request = get_request({**rewrite, "case_id": record.get("case_id", index)}, index, "requested_rewrite.")
    new = rewrite["target_new"]
    return CounterFactCase(
        case_id=get_field(record, index, "case_id", (int, str)),
        request=request,
        paraphrase_prompts=get_strings(record, index, "paraphrase_prompts"),
        neighborhood_prompts=get_strings(record, index, "neighborhood_prompts"),
        generation_prompts=_optional_strings(record, index, "generation_prompts"),
        attribute_prompts=_optional_strings(record, index, "attribute_prompts"),
        relation_id=rewrite.get("relation_id"),
        target_new_id=new.get("id") if isinstance(new, Mapping) else None,
    )


def _optional_strings(record: Mapping, index: int, name: str) -> list[str]:
    return get_strings(record, index, name, allow_empty=True) if name in record else []


def counterfact_training_example(case: CounterFactCase) -> TrainingExample:
    """The rewrite, its first paraphrase and its first neighborhood prompt."""
    target = case.request.target_new
    return TrainingExample((case.request.filled_prompt(), target), (case.paraphrase_prompts[0], target), case.neighborhood_prompts[0])


CF = DatasetSpec(
    name="cf",
    case_type=CounterFactCase,
    parse=parse_counterfact,
    metric=evaluate_counterfact_case,
    probes=counterfact_probes,
    scored_pairs=counterfact_pairs,
    training_example=counterfact_training_example,
    local_files=("counterfact.json",),
    remote_files=(
        RemoteFile("counterfact.json", "d017056125178a13728594e66a801357a8db9ed7973a7425554bb4271de9fc6f", 45_108_470),
    ),
    detect_order=0,
    has_generation=True,
)

# The same schema as cf, so detection reports a MultiCounterFact file as cf. Its host publishes
# no checksum: the download records the sha256 it first gets (trust on first use).
MCF = dataclasses.replace(
    CF, name="mcf", local_files=("multi_counterfact.json",), remote_files=(RemoteFile("multi_counterfact.json"),), detect_order=None
)


__all__ = ["CF", "MCF", "CounterFactCase", "counterfact_training_example", "parse_counterfact"]
