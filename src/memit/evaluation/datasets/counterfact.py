"""CounterFact and MultiCounterFact: a counterfactual rewrite with paraphrase, neighborhood
and generation prompts per record.

The metric, computed as the paper's code does.

Per prompt: the mean per-token NLL of ``target_new`` and ``target_true`` (teacher-forced)
and whether the model's argmax reproduces the whole expected target. Per case:
success = share of prompts where NLL(true) > NLL(new) (neighborhood: the reverse),
magnitude = mean of exp(-NLL(new)) - exp(-NLL(true)) (neighborhood: the reverse),
accuracy = share of prompts whose expected target is the argmax at every token.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.mend.train import TrainingExample
from memit.evaluation.answers import Probe
from memit.evaluation.datasets.base import DatasetError, DatasetSpec, RemoteFile
from memit.evaluation.datasets.fields import get_field, get_request, get_strings
from memit.predict import score_continuations
from memit.prompt_format import RAW, PromptFormat
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


# --- the metric ----------------------------------------------------------------------------

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


__all__ = ["CF", "CounterFactCase", "GROUPS", "MCF", "PromptScore", "accuracy", "counterfact_pairs", "counterfact_probes", "counterfact_training_example", "evaluate_counterfact_case", "magnitude", "parse_counterfact", "score_case", "success", "summarize_case"]
