"""Evaluation data sets: CounterFact, MultiCounterFact, zsRE, the reduced MEND CounterFact and MQuAKE.

Each data set is one `DatasetSpec` (in its family's module) and one row of
`DATASETS`. Every loader validates each record and raises `DatasetError` naming
the first bad record (its index in the file) and field.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from memit.errors import MissingFileError
from memit.evaluation.checksums import verify_recorded
from memit.evaluation.datasets.base import Case, DatasetError, DatasetSpec, RemoteFile
from memit.evaluation.datasets.cf_mend import CF_MEND, parse_cf_mend
from memit.evaluation.datasets.counterfact import CF, MCF, CounterFactCase, parse_counterfact
from memit.evaluation.datasets.mquake import MQUAKE, MquakeCase, parse_mquake
from memit.evaluation.datasets.zsre import ZSRE, ZsreCase, parse_zsre
from memit.utils.io import memit_home, read_json

if TYPE_CHECKING:
    from memit.editing.mend.train import TrainingExample

log = logging.getLogger(__name__)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (CF, MCF, ZSRE, CF_MEND, MQUAKE)}
DEFAULT_DATASET = "cf"


def register_dataset(spec: DatasetSpec, replace: bool = False) -> DatasetSpec:
    """Add a data set to `DATASETS` (``replace`` to overwrite one of the same name)."""
    if spec.name in DATASETS and not replace:
        raise DatasetError(f"dataset: {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


def get_dataset(name: str) -> DatasetSpec:
    """The description of data set ``name``; an unknown name raises `DatasetError`."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"dataset: unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None


def dataset_of(case: Any) -> DatasetSpec:
    """The first data set (in table order) whose cases have the type of ``case``."""
    for spec in DATASETS.values():
        if type(case) is spec.case_type:
            return spec
    raise DatasetError(f"dataset: no data set has cases of type {type(case).__name__}")


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: ``explicit``, else ``$MEMIT_DATA``, else ``$MEMIT_HOME/data``."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("MEMIT_DATA") or memit_home() / "data")


def default_data_file(dataset: str, folder: str | os.PathLike | None = None) -> Path:
    """Where the default file of ``dataset`` lives; raises with a download hint if missing."""
    spec = get_dataset(dataset)
    root = data_dir(folder)
    for name in spec.local_files:
        if (root / name).is_file():
            return root / name
    fetch = f"run `memit download {dataset}` (or pass" if spec.remote_files else "(pass"
    raise MissingFileError(
        f"dataset {dataset}: {root / spec.local_files[0]} does not exist; {fetch} --data-dir / set MEMIT_DATA, or --data-file PATH)"
    )


def parse_records(records: Any, dataset: str, source: str = "data") -> list[Any]:
    """Parse all records of ``dataset``; the first bad one raises `DatasetError`."""
    parse = get_dataset(dataset).parse
    if not isinstance(records, list):
        raise DatasetError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise DatasetError(f"{source}: the file holds no records")
    cases: list[Any] = []
    seen: dict[Any, int] = {}
    for index, record in enumerate(records):
        case = parse(record, index)
        if case.case_id in seen:
            raise DatasetError(f"record {index}: field 'case_id' {case.case_id!r} repeats record {seen[case.case_id]}")
        seen[case.case_id] = index
        cases.append(case)
    return cases


def detection_order() -> list[DatasetSpec]:
    """The data sets that take part in schema detection, in the order they are tried."""
    return sorted((s for s in DATASETS.values() if s.detect_order is not None), key=lambda s: s.detect_order)


def detect_schema(records: Any) -> str:
    """The data set whose schema fits ``records``; raises with the best-fitting schema's first error."""
    candidates = detection_order()
    errors: list[tuple[int, str, DatasetError]] = []
    for spec in candidates:
        try:
            parse_records(records, spec.name)
            return spec.name
        except DatasetError as err:
            errors.append((_record_index(str(err)), spec.name, err))
    if not errors:
        raise DatasetError("dataset: no data set takes part in schema detection; name one")
    _, dataset, err = max(errors, key=lambda e: e[0])
    schemas = ", ".join(_schema_label(spec) for spec in candidates)
    raise DatasetError(f"the file fits none of the schemas ({schemas}); closest is {dataset}: {err}")


def _schema_label(spec: DatasetSpec) -> str:
    """``spec``'s name with the names of the data sets that share its parser (``cf/mcf``)."""
    return "/".join(s.name for s in DATASETS.values() if s.parse is spec.parse)


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
) -> tuple[str, Path, list[Any]]:
    """Load and validate a data set; returns ``(dataset, file, cases)``. With a ``data_file``
    and no ``dataset`` the schema is detected."""
    path = Path(data_file) if data_file else default_data_file(dataset or DEFAULT_DATASET, folder)
    if path.is_file():
        verify_recorded(path)  # a downloaded file without a published checksum must not have changed since
    records = read_json(path, what="data file")
    if dataset is None:
        try:
            dataset = detect_schema(records)
        except DatasetError as err:
            raise DatasetError(f"data file {path}: {err}") from None
    try:
        cases = parse_records(records, dataset, source=str(path))
    except DatasetError as err:
        raise DatasetError(f"data file {path} ({dataset} schema): {err}") from None
    log.info("Loaded %d %s cases from %s", len(cases), dataset, path)
    return dataset, path, cases[:limit] if limit is not None else cases


def training_examples(cases: Iterable[Any], dataset: str) -> list["TrainingExample"]:
    """MEND training examples of cases of ``dataset``."""
    spec = get_dataset(dataset)
    if spec.training_example is None:
        raise DatasetError(f"dataset: {dataset} has no MEND training examples; train on cf, zsre or cf-mend")
    return [spec.training_example(case) for case in cases]


__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "Case",
    "CounterFactCase",
    "DatasetError",
    "DatasetSpec",
    "MquakeCase",
    "RemoteFile",
    "ZsreCase",
    "data_dir",
    "dataset_of",
    "default_data_file",
    "detect_schema",
    "get_dataset",
    "load_cases",
    "parse_cf_mend",
    "parse_counterfact",
    "parse_mquake",
    "parse_records",
    "parse_zsre",
    "register_dataset",
    "training_examples",
]
