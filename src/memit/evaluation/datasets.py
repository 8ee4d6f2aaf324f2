"""Evaluation data sets: CounterFact, MultiCounterFact, zsRE and the reduced MEND CounterFact.

Every loader validates each record and raises :class:`DatasetError` naming the first bad
record (its index in the file) and field.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from memit.requests import EditRequest, RequestError, parse_request
from memit.utils.io import memit_home, read_json

log = logging.getLogger(__name__)

DATASETS = ("cf", "mcf", "zsre", "cf-mend")
# Default file of each data set inside the data folder (alternatives tried in order).
DEFAULT_FILES: dict[str, tuple[str, ...]] = {
    "cf": ("counterfact.json",),
    "mcf": ("multi_counterfact.json",),
    "zsre": ("zsre_mend_eval.json",),
    "cf-mend": ("counterfact-edit.json", "counterfact_mend/counterfact-edit.json"),
}


class DatasetError(ValueError):
    """A data file does not fit its schema; the message names the record and the field."""


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


@dataclass(frozen=True)
class ZsreCase:
    """A zsRE case: the edit question, its rephrase and an unrelated NQ question."""

    case_id: int | str
    request: EditRequest
    rephrase: str
    loc: str
    loc_ans: str


Case = Union[CounterFactCase, ZsreCase]


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: ``explicit``, else ``$MEMIT_DATA``, else ``$MEMIT_HOME/data``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("MEMIT_DATA") or memit_home() / "data")


def default_data_file(dataset: str, folder: str | os.PathLike | None = None) -> Path:
    """Where the default file of ``dataset`` lives; raises with a download hint if missing."""
    check_dataset_name(dataset)
    root = data_dir(folder)
    for name in DEFAULT_FILES[dataset]:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"dataset {dataset}: {root / DEFAULT_FILES[dataset][0]} does not exist; run `memit download {dataset}` "
        f"(or pass --data-dir / set MEMIT_DATA, or --data-file PATH)"
    )


def check_dataset_name(dataset: str) -> None:
    if dataset not in DATASETS:
        raise DatasetError(f"dataset: unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")


# --- record parsers -------------------------------------------------------------------


def _field(record: Any, index: int, name: str, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(record, Mapping):
        raise DatasetError(f"record {index}: expected an object, got {type(record).__name__}")
    if name not in record:
        raise DatasetError(f"record {index}: missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DatasetError(f"record {index}: field '{name}' must be {want}, got {type(value).__name__}")
    return value


def _strings(record: Mapping, index: int, name: str, allow_empty: bool = False) -> list[str]:
    values = _field(record, index, name, list)
    for j, value in enumerate(values):
        if not isinstance(value, str):
            raise DatasetError(f"record {index}: field '{name}[{j}]' must be a string, got {type(value).__name__}")
    if not values and not allow_empty:
        raise DatasetError(f"record {index}: field '{name}' is empty")
    return values


def _request(raw: Mapping, index: int, where: str) -> EditRequest:
    try:
        return parse_request(raw, index)
    except RequestError as err:
        message = str(err).replace(f"request {index}: ", "")
        message = message.replace("field '", f"field '{where}") if where else message
        raise DatasetError(f"record {index}: {message}") from None


def _subject_template(text: str, subject: str, index: int, fieldname: str) -> str:
    if subject not in text:
        raise DatasetError(f"record {index}: field '{fieldname}' does not contain the subject {subject!r}")
    return text.replace(subject, "{}", 1)


def parse_counterfact(record: Any, index: int) -> CounterFactCase:
    """A record of ``counterfact.json`` / ``multi_counterfact.json``."""
    rewrite = _field(record, index, "requested_rewrite", Mapping)
    if "target_true" not in rewrite:
        raise DatasetError(f"record {index}: missing field 'requested_rewrite.target_true'")
    request = _request({**rewrite, "case_id": record.get("case_id", index)}, index, "requested_rewrite.")
    new = rewrite["target_new"]
    return CounterFactCase(
        case_id=_field(record, index, "case_id", (int, str)),
        request=request,
        paraphrase_prompts=_strings(record, index, "paraphrase_prompts"),
        neighborhood_prompts=_strings(record, index, "neighborhood_prompts"),
        generation_prompts=_strings(record, index, "generation_prompts", allow_empty=True) if "generation_prompts" in record else [],
        attribute_prompts=_strings(record, index, "attribute_prompts", allow_empty=True) if "attribute_prompts" in record else [],
        relation_id=rewrite.get("relation_id"),
        target_new_id=new.get("id") if isinstance(new, Mapping) else None,
    )


def parse_cf_mend(record: Any, index: int) -> CounterFactCase:
    """A row of the reduced MEND/EasyEdit CounterFact files (subject filled into ``prompt``)."""
    subject = _field(record, index, "subject")
    prompt = _subject_template(_field(record, index, "prompt"), subject, index, "prompt")
    raw = {
        "prompt": prompt,
        "subject": subject,
        "target_new": _field(record, index, "target_new"),
        "target_true": _field(record, index, "ground_truth"),
    }
    request = _request(raw, index, "")
    return CounterFactCase(
        case_id=_field(record, index, "case_id", (int, str)),
        request=EditRequest(request.prompt, request.subject, request.target_new, request.target_true, record["case_id"]),
        paraphrase_prompts=[_field(record, index, "rephrase_prompt")],
        neighborhood_prompts=[_field(record, index, "locality_prompt")],
    )


def parse_zsre(record: Any, index: int) -> ZsreCase:
    """A record of ``zsre_mend_eval.json``; the new target is ``alt``."""
    subject = _field(record, index, "subject")
    prompt = _subject_template(_field(record, index, "src"), subject, index, "src")
    alt = _field(record, index, "alt")
    request = _request({"prompt": prompt, "subject": subject, "target_new": alt, "case_id": index}, index, "")
    loc = _field(record, index, "loc")
    loc_ans = _field(record, index, "loc_ans")
    if not loc_ans.strip():
        raise DatasetError(f"record {index}: field 'loc_ans' is empty")
    return ZsreCase(
        case_id=record.get("case_id", index) if isinstance(record.get("case_id", index), (int, str)) else index,
        request=request,
        rephrase=_field(record, index, "rephrase"),
        loc=loc,
        loc_ans=loc_ans,
    )


PARSERS: dict[str, Callable[[Any, int], Case]] = {
    "cf": parse_counterfact,
    "mcf": parse_counterfact,
    "zsre": parse_zsre,
    "cf-mend": parse_cf_mend,
}


def parse_records(records: Any, dataset: str, source: str = "data") -> list[Case]:
    """Parse all records of ``dataset``; the first bad one raises :class:`DatasetError`."""
    check_dataset_name(dataset)
    if not isinstance(records, list):
        raise DatasetError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DatasetError(f"{source}: the file holds no records")
    parser = PARSERS[dataset]
    cases: list[Case] = []
    seen: dict[Any, int] = {}
    for index, record in enumerate(records):
        case = parser(record, index)
        if case.case_id in seen:
            raise DatasetError(f"record {index}: field 'case_id' {case.case_id!r} repeats record {seen[case.case_id]}")
        seen[case.case_id] = index
        cases.append(case)
    return cases


def detect_schema(records: Any) -> str:
    """The data set whose schema fits ``records``; raises with the best-fitting schema's first error."""
    errors: list[tuple[int, str, DatasetError]] = []
    for dataset in ("cf", "zsre", "cf-mend"):
        try:
            parse_records(records, dataset)
            return dataset
        except DatasetError as err:
            reached = _record_index(str(err))
            errors.append((reached, dataset, err))
    reached, dataset, err = max(errors, key=lambda e: e[0])
    raise DatasetError(f"the file fits none of the schemas (cf/mcf, zsre, cf-mend); closest is {dataset}: {err}")


def _record_index(message: str) -> int:
    if message.startswith("record "):
        try:
            return int(message.split()[1].rstrip(":"))
        except ValueError:
            pass
    return -1


def load_cases(
    dataset: str | None,
    data_file: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    limit: int | None = None,
) -> tuple[str, Path, list[Case]]:
    """Load and validate a data set; returns ``(dataset, file, cases)``. With a ``data_file``
    and no ``dataset`` the schema is detected."""
    path = Path(data_file) if data_file else default_data_file(dataset or "cf", folder)
    records = read_json(path, what="data file")
    if dataset is None:
        dataset = detect_schema(records)
    try:
        cases = parse_records(records, dataset, source=str(path))
    except DatasetError as err:
        raise DatasetError(f"data file {path} ({dataset} schema): {err}") from None
    log.info("Loaded %d %s cases from %s", len(cases), dataset, path)
    return dataset, path, cases[:limit] if limit is not None else cases


__all__ = [
    "DATASETS",
    "Case",
    "CounterFactCase",
    "DatasetError",
    "ZsreCase",
    "data_dir",
    "default_data_file",
    "detect_schema",
    "load_cases",
    "parse_records",
]
