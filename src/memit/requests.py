"""Edit requests in the paper's form, validated before any weight changes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from transformers import PreTrainedTokenizerBase

from memit.errors import InputError
from memit.utils.io import read_json


class RequestError(InputError):
    """A request is malformed; the message names the request index and the field."""


@dataclass(frozen=True)
class EditRequest:
    """``prompt`` holds one ``{}`` where ``subject`` goes; targets carry a leading space."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None

    def filled_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)

    def to_dict(self) -> dict[str, Any]:
        """The paper's dictionary form."""
        out: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target_new": {"str": self.target_new}}
        if self.target_true is not None:
            out["target_true"] = {"str": self.target_true}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        return out


def parse_request(raw: Mapping[str, Any] | EditRequest, index: int = 0) -> EditRequest:
    """Build an :class:`EditRequest` from the paper's dict (or a CounterFact record)."""
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
    )
    return _checked(request, index)


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
    return parse_requests(data if isinstance(data, list) else [data])


def subject_token_index(tok: PreTrainedTokenizerBase, text_template: str, subject: str) -> int:
    """Index of the subject's last token in ``text_template`` with ``{}`` filled by ``subject``.

    Raises :class:`RequestError` when the subject does not end on a token boundary of the
    full text (for example "{}ian" with subject "Paris"), since its last token is then
    not a token of the prompt.
    """
    prefix = text_template[: text_template.index("{}")]
    upto_subject = tok(prefix + subject)["input_ids"]
    full = tok(text_template.replace("{}", subject, 1))["input_ids"]
    if full[: len(upto_subject)] != upto_subject:
        raise RequestError(f"subject: the tokens of {subject!r} cannot be located in {text_template!r}")
    return len(upto_subject) - 1


def check_tokenization(requests: list[EditRequest], tok: PreTrainedTokenizerBase) -> None:
    """Check that every subject can be located in its prompt, naming the request on failure."""
    for i, request in enumerate(requests):
        try:
            subject_token_index(tok, request.prompt, request.subject)
        except RequestError as err:
            raise RequestError(f"request {i}: {err}") from None


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
    "check_tokenization",
    "load_requests",
    "parse_request",
    "parse_requests",
    "subject_token_index",
]
