"""Edit requests in the paper's form, validated before any weight changes."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from transformers import PreTrainedTokenizerBase

from memit.errors import InputError
from memit.utils.io import read_json

log = logging.getLogger(__name__)


class RequestError(InputError):
    """A request is malformed; the message names the request index and the field."""


@dataclass(frozen=True)
class EditRequest:
    """``prompt`` holds one ``{}`` where ``subject`` goes; targets carry a leading space.
    ``questions``: other ways the fact will be asked, each with one ``{}`` for the subject
    ("What sport does {} play?"), for target vectors optimised in the ``question`` form."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    questions: tuple[str, ...] = ()

    def filled_prompt(self) -> str:
        """The prompt with the subject in place of ``{}``."""
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        """The paper's dictionary form."""
        out: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target_new": {"str": self.target_new}}
        if self.target_true is not None:
            out["target_true"] = {"str": self.target_true}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        if self.questions:
            out["questions"] = list(self.questions)
        return out


def parse_request(raw: Mapping[str, Any] | EditRequest, index: int = 0) -> EditRequest:
    """Build an `EditRequest` from the paper's dict (or a CounterFact record)."""
    if isinstance(raw, EditRequest):
        return _checked(raw, index)
    if not isinstance(raw, Mapping):
        raise RequestError(f"request {index}: expected an object, got {type(raw).__name__}")
    if "requested_rewrite" in raw:  # a whole CounterFact record
        return parse_request({**raw["requested_rewrite"], "case_id": raw.get("case_id")}, index)
    for field in ("prompt", "subject", "target_new"):
        if field not in raw:
            raise RequestError(f"request {index}: missing field '{field}'")
    request = EditRequest(
        prompt=_text(raw["prompt"], index, "prompt"),
        subject=_text(raw["subject"], index, "subject"),
        target_new=_target(raw["target_new"], index, "target_new"),
        target_true=None if raw.get("target_true") is None else _target(raw["target_true"], index, "target_true"),
        case_id=raw.get("case_id"),
        questions=_questions(raw.get("questions"), index),
    )
    return _checked(request, index)


def _questions(value: Any, index: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestError(f"request {index}: field 'questions' must be a list of strings, got {type(value).__name__}")
    for j, question in enumerate(value):
        if not isinstance(question, str) or question.count("{}") != 1:
            raise RequestError(f"request {index}: field 'questions[{j}]' must be a string with one '{{}}' for the subject, got {question!r}")
    return tuple(value)


def conflict_key(request: EditRequest) -> tuple[str, str]:
    """Two requests of one batch with this key must ask for the same target: the subject in the prompt."""
    return (request.subject, request.prompt)


def parse_requests(raws: Iterable[Mapping[str, Any] | EditRequest]) -> list[EditRequest]:
    """Parse and validate a batch, rejecting duplicates that ask for different targets."""
    requests = [parse_request(raw, i) for i, raw in enumerate(raws)]
    if not requests:
        raise RequestError("requests: the list is empty")
    seen: dict[tuple[str, str], tuple[int, str]] = {}
    for i, request in enumerate(requests):
        key = conflict_key(request)
        if key in seen and seen[key][1] != request.target_new:
            j, other = seen[key]
            raise RequestError(
                f"request {i}: duplicate of request {j} (same subject and prompt) with a different "
                f"target_new ({request.target_new!r} vs {other!r})"
            )
        seen.setdefault(key, (i, request.target_new))
    return requests


def load_requests(path: str | Path) -> list[EditRequest]:
    """Read a JSON list of requests (or a single request object)."""
    data = read_json(path, what="requests file")
    try:
        return parse_requests(data if isinstance(data, list) else [data])
    except RequestError as err:
        raise RequestError(f"requests file {path}: {err}") from None


@dataclass(frozen=True)
class SubjectToken:
    """Where a request's keys are read and its target vector is optimised: the last token of
    the filled prompt that overlaps the subject's characters."""

    index: int
    text: str  # the token's characters in the filled prompt
    merged: bool  # the token runs past the subject's end (")?" in "(APA-56)?")


def subject_token(tok: PreTrainedTokenizerBase, text_template: str, subject: str) -> SubjectToken:
    """The subject's last token in ``text_template`` with ``{}`` filled by ``subject``.

    A BPE tokenizer may merge the subject's last characters with what follows it (")" and "?"
    into ")?"), so that no token ends where the subject ends; like the paper's code, the edit
    is then made at the last token that overlaps the subject. Raises `RequestError`
    (naming the field) only when no token covers the subject's characters.
    """
    start = text_template.index("{}")
    end = start + len(subject)
    text = text_template.replace("{}", subject, 1)
    if getattr(tok, "is_fast", False):
        return _overlapping_token(tok, text, subject, start, end)
    return _token_after_prefix(tok, text, end)


def _overlapping_token(tok: PreTrainedTokenizerBase, text: str, subject: str, start: int, end: int) -> SubjectToken:
    """The last token whose characters (the tokenizer's offsets) overlap ``text[start:end]``."""
    spans = tok(text, return_offsets_mapping=True)["offset_mapping"]
    # Special tokens (a BOS) have empty spans and cover no character.
    inside = [i for i, (a, b) in enumerate(spans) if b > a and a < end and b > start]
    if not inside:
        raise RequestError(f"subject: no token of {text!r} covers the subject {subject!r}")
    a, b = spans[inside[-1]]
    return SubjectToken(inside[-1], text[a:b], merged=b > end)


def _token_after_prefix(tok: PreTrainedTokenizerBase, text: str, end: int) -> SubjectToken:
    """A slow tokenizer has no offsets: the paper's position, the number of tokens of the
    text up to the subject's end, less one (exact unless that text's tokens differ)."""
    upto_subject = tok(text[:end])["input_ids"]
    full = tok(text)["input_ids"]
    index = min(len(upto_subject), len(full)) - 1
    return SubjectToken(index, tok.decode(full[index : index + 1]), merged=full[: len(upto_subject)] != upto_subject)


def subject_token_index(tok: PreTrainedTokenizerBase, text_template: str, subject: str) -> int:
    """Index of the subject's last token (`subject_token`) in the filled ``text_template``."""
    return subject_token(tok, text_template, subject).index


def check_tokenization(requests: list[EditRequest], tok: PreTrainedTokenizerBase) -> list[SubjectToken]:
    """Each request's subject token; a subject no token covers is refused, naming the request."""
    tokens = []
    for i, request in enumerate(requests):
        try:
            tokens.append(subject_token(tok, request.prompt, request.subject))
        except RequestError as err:
            raise RequestError(f"request {i}: {err}") from None
    return tokens


def merged_subject_note(request: EditRequest, token_text: str) -> str:
    """What to tell about a request whose subject ends inside the token ``token_text``."""
    return (
        f"the subject {request.subject!r} ends inside the token {token_text!r} of {request.filled_prompt()!r}; "
        "it is edited at that token, as the paper's code does"
    )


def warn_merged_subjects(requests: list[EditRequest], tokens: list[SubjectToken]) -> None:
    """One warning per request whose subject ends inside a token (its edit may be weaker)."""
    for request, token in zip(requests, tokens):
        if token.merged:
            where = "" if request.case_id is None else f" (case {request.case_id})"
            log.warning("Request%s: %s", where, merged_subject_note(request, token.text))


def _checked(request: EditRequest, index: int) -> EditRequest:
    if request.prompt.count("{}") != 1:
        raise RequestError(
            f"request {index}: field 'prompt' must contain exactly one '{{}}' for the subject, got {request.prompt!r}"
        )
    for field in ("subject", "target_new"):
        if not getattr(request, field).strip():
            raise RequestError(f"request {index}: field '{field}' is empty")
    if request.target_true is not None and not request.target_true.strip():
        raise RequestError(f"request {index}: field 'target_true' is empty")
    return EditRequest(
        prompt=request.prompt,
        subject=request.subject,
        target_new=_with_space(request.target_new),
        target_true=None if request.target_true is None else _with_space(request.target_true),
        case_id=request.case_id,
        questions=_questions(list(request.questions), index),
    )


def _text(value: Any, index: int, field: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"request {index}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _target(value: Any, index: int, field: str) -> str:
    if isinstance(value, Mapping):
        if "str" not in value:
            raise RequestError(f"request {index}: field '{field}' needs a 'str' entry")
        value = value["str"]
    return _text(value, index, field)


def _with_space(target: str) -> str:
    # Targets follow the prompt after a space; tokenizing them with it matches the text.
    return target if target.startswith(" ") else " " + target


__all__ = [
    "EditRequest",
    "RequestError",
    "SubjectToken",
    "check_tokenization",
    "load_requests",
    "merged_subject_note",
    "parse_request",
    "parse_requests",
    "subject_token",
    "subject_token_index",
    "warn_merged_subjects",
]
