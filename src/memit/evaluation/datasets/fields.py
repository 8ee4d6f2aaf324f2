"""Reading the fields of a data record; every error names the record (its index in the
file) and the field."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memit.evaluation.datasets.base import DatasetError
from memit.requests import EditRequest, RequestError, parse_request


def get_field(record: Any, index: int, name: str, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(record, Mapping):
        raise DatasetError(f"record {index}: expected an object, got {type(record).__name__}")
    if name not in record:
        raise DatasetError(f"record {index}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"record {index}: field '{name}' must be {want}, got {type(value).__name__}")
    return value


def get_strings(record: Mapping, index: int, name: str, allow_empty: bool = False) -> list[str]:
    values = get_field(record, index, name, list)
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise DatasetError(f"record {index}: field '{name}[{j}]' must be a string, got {type(value).__name__}")
    if not values and not allow_empty:
        raise DatasetError(f"record {index}: field '{name}' is empty")
    return values


def get_request(raw: Mapping, index: int, where: str) -> EditRequest:
    """An edit request from ``raw``; ``where`` prefixes field names in errors (e.g. the
    object the request's fields were read from)."""
    try:
        return parse_request(raw, index)
    except RequestError as err:
        message = str(err).replace(f"request {index}: ", "")
        message = message.replace("field '", f"field '{where}") if where else message
        raise DatasetError(f"record {index}: {message}") from None


def subject_template(text: str, subject: str, index: int, fieldname: str) -> str:
    """``text`` with its first occurrence of ``subject`` replaced by ``{}``."""
    if subject not in text:
        raise DatasetError(f"record {index}: field '{fieldname}' does not contain the subject {subject!r}")
    return text.replace(subject, "{}", 1)


__all__ = ["get_field", "get_request", "get_strings", "subject_template"]
