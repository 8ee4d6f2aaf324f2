"""MQuAKE (Zhong et al. 2023): multi-hop questions whose answers must change as a
consequence of one to four edited facts. A case is a chain of facts; its edits are made
together with the other cases of the batch, and it counts as answered when any of its three
phrasings of the multi-hop question is (MQuAKE's rule).

MQuAKE metrics. Teacher-forced, per case (as CounterFact compares two targets):

- ``efficacy_success``: share of the case's edits whose cloze statement now prefers the new
  target to the true one (lower mean per-token NLL);
- ``paraphrase_success``: the same after each edit's question;
- ``multihop_success``: 1 if after any of the three phrasings of the multi-hop question the
  new answer is preferred to the old one (MQuAKE's "any of three" rule).

The generated-answer metrics judge greedy answers to the same prompts: ``gen_multihop``
accepts the new answer or any of its aliases.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.evaluation.answers import Probe
from memit.evaluation.datasets.base import DatasetError, DatasetSpec, RemoteFile
from memit.evaluation.datasets.fields import get_field, get_request, get_strings
from memit.predict import score_continuations
from memit.prompt_format import RAW, PromptFormat
from memit.requests import EditRequest

# The data sets' home, pinned to a commit (main on 2024-09-12, "update mquake-cf-3k-v2 (#12)")
# so that the files cannot change under a moving branch. The repository publishes no
# sha256; the commit's tree names each file's git blob id, which the download checks, and
# the sha256 of the first download is recorded beside the data (see memit.evaluation.download).
MQUAKE_COMMIT = "fb43dadc2d8cd19d08ce81c63d957b59deb3f3cd"
MQUAKE_HOST = f"https://raw.githubusercontent.com/princeton-nlp/MQuAKE/{MQUAKE_COMMIT}/datasets"


@dataclass(frozen=True)
class MquakeCase:
    """A chain of facts: the edits it needs, the single-hop questions of the edited facts
    and the multi-hop question (three phrasings) with its answers before and after."""

    case_id: int | str
    requests: tuple[EditRequest, ...]
    edit_questions: tuple[str, ...]  # one per edit, asking for its new target
    questions: tuple[str, ...]
    answer: str
    answer_aliases: tuple[str, ...]
    new_answer: str
    new_answer_aliases: tuple[str, ...]

    @property
    def request(self) -> EditRequest:
        return self.requests[0]


def parse_mquake(record: Any, index: int) -> MquakeCase:
    """A record of ``MQuAKE-CF-3k.json`` / ``MQuAKE-CF.json`` / ``MQuAKE-T.json``."""
    case_id = get_field(record, index, "case_id", (int, str))
    rewrites = get_field(record, index, "requested_rewrite", list)
    if not rewrites:
        raise DatasetError(f"record {index}: field 'requested_rewrite' is empty")
    requests, edit_questions = [], []
    for j, rewrite in enumerate(rewrites):
        where = f"requested_rewrite[{j}]"
        if not isinstance(rewrite, Mapping):
            raise DatasetError(f"record {index}: field '{where}' must be an object")
        if "target_true" not in rewrite:
            raise DatasetError(f"record {index}: missing field '{where}.target_true'")
        requests.append(get_request({**rewrite, "case_id": case_id}, index, f"{where}."))
        try:
            edit_questions.append(get_field(rewrite, index, "question"))
        except DatasetError as err:
            raise DatasetError(str(err).replace("field '", f"field '{where}.")) from None
    return MquakeCase(
        case_id=case_id,
        requests=tuple(requests),
        edit_questions=tuple(edit_questions),
        questions=tuple(get_strings(record, index, "questions")),
        answer=get_field(record, index, "answer"),
        answer_aliases=tuple(_aliases(record, index, "answer_alias")),
        new_answer=get_field(record, index, "new_answer"),
        new_answer_aliases=tuple(_aliases(record, index, "new_answer_alias")),
    )


def _aliases(record: Mapping, index: int, name: str) -> list[str]:
    return get_strings(record, index, name, allow_empty=True) if name in record else []


# --- the metric ----------------------------------------------------------------------------

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


MQUAKE = DatasetSpec(
    name="mquake",
    case_type=MquakeCase,
    parse=parse_mquake,
    metric=evaluate_mquake_case,
    probes=mquake_probes,
    any_groups=frozenset({MULTIHOP}),
    local_files=("MQuAKE-CF-3k.json", "MQuAKE-CF.json", "MQuAKE-T.json"),
    remote_files=(
        RemoteFile("MQuAKE-CF-3k.json", base_url=MQUAKE_HOST, git_blob="b9d0963c6c1c81b24d8113ffdc3fd0865a423e18"),
        RemoteFile("MQuAKE-T.json", base_url=MQUAKE_HOST, git_blob="afd89d0c8fe5e304f771bad88cc0ced611278fe0"),
    ),
    detect_order=3,
)


__all__ = ["MQUAKE", "MQUAKE_COMMIT", "MQUAKE_HOST", "MULTIHOP", "MquakeCase", "evaluate_mquake_case", "mquake_probes", "parse_mquake"]
