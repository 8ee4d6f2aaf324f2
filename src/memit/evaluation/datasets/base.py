"""What describes an evaluation data set: one :class:`DatasetSpec` per data set, holding
everything the loader, downloader, runner, summaries and MEND training need to know."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from memit.errors import InputError
from memit.requests import EditRequest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from memit.editing.mend.train import TrainingExample


class DatasetError(InputError):
    """A data file does not fit its schema; the message names the record and the field."""


class Case(Protocol):
    """What the runner needs of any case: an id unique in its file and the edit to make."""

    @property
    def case_id(self) -> int | str: ...

    @property
    def request(self) -> EditRequest: ...


@dataclass(frozen=True)
class RemoteFile:
    """A file on the data host; ``sha256``/``size`` are None where the host gives none."""

    name: str
    sha256: str | None = None
    size: int | None = None


Parser = Callable[[Any, int], Any]  # (record, its index in the file) -> case
Metric = Callable[["PreTrainedModel", "PreTrainedTokenizerBase", Any], dict]


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation data set.

    ``parse`` turns a record into a case of ``case_type`` (raising :class:`DatasetError`
    naming the record and field); ``local_files`` are the default file names in the data
    folder, tried in order; ``remote_files`` are what ``memit download <name>`` fetches;
    ``detect_order`` places the schema in detection (None: chosen by name only, e.g. a
    schema that another data set already detects); ``has_generation`` says its cases carry
    ``generation_prompts`` (and ``relation_id``/``target_new_id``) for fluency and
    consistency; ``labels`` override summary labels of metrics.
    """

    name: str
    case_type: type
    parse: Parser
    metric: Metric
    training_example: Callable[[Any], "TrainingExample"]
    local_files: tuple[str, ...]
    remote_files: tuple[RemoteFile, ...] = ()
    detect_order: int | None = None
    has_generation: bool = False
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not self.local_files:
            raise ValueError(f"dataset {self.name}: local_files must name at least one file")

    def evaluate_case(self, model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", case: Any) -> dict:
        """The case's metrics on the model as it is now (generation metrics aside)."""
        return self.metric(model, tok, case)


__all__ = ["Case", "DatasetError", "DatasetSpec", "Metric", "Parser", "RemoteFile"]
