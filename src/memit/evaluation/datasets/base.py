"""What describes an evaluation data set: one `DatasetSpec` per data set, holding
everything the loader, downloader, runner, summaries and MEND training need to know."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

from memit.errors import InputError
from memit.requests import EditRequest

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from memit.editing.mend.train import TrainingExample
    from memit.evaluation.answers import Probe
    from memit.prompt_format import PromptFormat


class DatasetError(InputError):
    """A data file does not fit its schema; the message names the record and the field."""


class Case(Protocol):
    """What the runner needs of any case: an id unique in its file and the edit to make."""

    @property
    def case_id(self) -> int | str: ...

    @property
    def request(self) -> EditRequest: ...


def case_requests(case: Case) -> tuple[EditRequest, ...]:
    """The edits a case asks for: its ``requests`` if it has several (MQuAKE), else its one ``request``."""
    requests = getattr(case, "requests", None)
    return tuple(requests) if requests else (case.request,)


@dataclass(frozen=True)
class RemoteFile:
    """A file on the data host; ``sha256``/``size`` are None where the host gives none;
    ``base_url`` is the folder it is in when that is not the paper's host; ``git_blob`` is
    git's id of the file's content (a SHA-1) where a git tree pins it and no sha256 is known."""

    name: str
    sha256: str | None = None
    size: int | None = None
    base_url: str | None = None
    git_blob: str | None = None


Parser = Callable[[Any, int], Any]  # (record, its index in the file) -> case
# (model, tokenizer, case, prompt format) -> teacher-forced metrics of the case
Metric = Callable[["PreTrainedModel", "PreTrainedTokenizerBase", Any, "PromptFormat"], dict]
Probes = Callable[[Any], list["Probe"]]


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation data set.

    ``parse`` turns a record into a case of ``case_type`` (raising `DatasetError`
    naming the record and field); ``local_files`` are the default file names in the data
    folder, tried in order; ``remote_files`` are what ``memit download <name>`` fetches;
    ``detect_order`` places the schema in detection (None: chosen by name only, e.g. a
    schema that another data set already detects); ``has_generation`` says its cases carry
    ``generation_prompts`` (and ``relation_id``/``target_new_id``) for fluency and
    consistency; ``scored_pairs`` lists what the metric scores; ``probes`` are the questions whose greedy answers give the
    generation-based metrics (None: the data set has none); an ``any_groups`` group counts
    a case as answered when any of its probes is; ``labels`` override summary labels of
    metrics.
    """

    name: str
    case_type: type
    parse: Parser
    metric: Metric
    local_files: tuple[str, ...]
    # None: the data set has no example of an unrelated prompt to train MEND on.
    training_example: Callable[[Any], "TrainingExample"] | None = None
    remote_files: tuple[RemoteFile, ...] = ()
    detect_order: int | None = None
    has_generation: bool = False
    probes: Probes | None = None
    any_groups: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    # The (prompt, continuation) pairs the metric scores teacher-forced, so that the runner
    # scores several cases in shared batches (None: each case on its own).
    scored_pairs: Callable[[Any, "PromptFormat"], list[tuple[str, str]]] | None = None

    def __post_init__(self) -> None:
        if not self.local_files:
            raise ValueError(f"dataset {self.name}: local_files must name at least one file")

    def evaluate_case(self, model: "PreTrainedModel", tok: "PreTrainedTokenizerBase", case: Any, fmt: "PromptFormat") -> dict:
        """The case's teacher-forced metrics on the model as it is now."""
        return self.metric(model, tok, case, fmt)


__all__ = ["Case", "DatasetError", "DatasetSpec", "Metric", "Parser", "Probes", "RemoteFile", "case_requests"]
