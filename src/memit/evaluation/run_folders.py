"""Run folders: ``<out>/<ALG>/run_<NNN>/`` with ``params.json`` (what was run) and one JSON
per case; numbering, finding a run to continue, and checking that it is continued as started."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memit.editing.hparams import HyperParams
from memit.errors import InputError
from memit.evaluation.answers import DEFAULT_ANSWER_TOKENS
from memit.evaluation.datasets import DEFAULT_DATASET, Case
from memit.utils import distributed
from memit.utils.io import read_json, write_json
from memit.utils.paths import child_path, path_component

log = logging.getLogger(__name__)

PARAMS_FILE = "params.json"


_RUN = re.compile(r"run_(\d+)$")


# Parameters that must agree for a run to be continued.
RUN_IDENTITY = (
    "alg", "model", "dtype", "dataset", "data_file", "num_edits", "sequential_batches", "limit",
    "chat_template", "skip_generation", "generation_tokens", "generation_interval", "generated_answers", "answer_tokens",
    "score_interval",
)


class RunError(InputError):
    """A run cannot be started or continued as asked."""


@dataclass
class RunConfig:
    """What to evaluate; stored as ``params.json`` in the run folder."""

    alg: str = "MEMIT"
    model: str = "default"
    dataset: str | None = DEFAULT_DATASET
    data_file: str | None = None
    data_dir: str | None = None
    num_edits: int = 1
    sequential_batches: int = 1
    limit: int | None = None
    hparams: str | None = None
    # How the model is loaded (see memit.load_model).
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    offload_folder: str | None = None
    # Prompts as a user turn of the model's chat template instead of as written.
    chat_template: bool = False
    # The paper's 100-token fluency and consistency generations.
    skip_generation: bool = False
    generation_tokens: int = 100
    # Fluency and consistency on every N-th case only (the paper's generation_test_interval).
    generation_interval: int = 1
    # Short greedy answers judged against the targets (the gen_* metrics).
    generated_answers: bool = True
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    # Score every N-th case only; every case is still edited. Evenly spaced, so a sequential
    # run's sample holds edits of every age.
    score_interval: int = 1
    # Keep each batch's weight changes under <out>/.edit_cache and reuse them in any run that
    # makes the same edit (e.g. the same edits scored with and without the chat template).
    reuse_edits: bool = False
    out: str = "results"
    continue_from_run: str | None = None

    @property
    def answer_limit(self) -> int | None:
        """Tokens per generated answer; None when generated answers are off."""
        return self.answer_tokens if self.generated_answers else None

    def __post_init__(self) -> None:
        if self.num_edits < 1:
            raise RunError(f"num_edits: must be at least 1, got {self.num_edits}")
        if self.sequential_batches < 1:
            raise RunError(f"sequential_batches: must be at least 1, got {self.sequential_batches}")
        if self.generation_interval < 1:
            raise RunError(f"generation_interval: must be at least 1, got {self.generation_interval}")
        if self.score_interval < 1:
            raise RunError(f"score_interval: must be at least 1, got {self.score_interval}")
        if self.limit is not None and self.limit < 1:
            raise RunError(f"limit: must be at least 1, got {self.limit}")
        if self.answer_tokens < 1:
            raise RunError(f"answer_tokens: must be at least 1, got {self.answer_tokens}")


def run_root(out: str | Path, alg: str) -> Path:
    return child_path(out, path_component(alg))


def new_run_dir(out: str | Path, alg: str) -> Path:
    """Create ``<out>/<alg>/run_<NNN>`` with the next free number."""
    root = run_root(out, alg)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        numbers = [int(m.group(1)) for p in root.iterdir() if (m := _RUN.match(p.name))]
        candidate = root / f"run_{max(numbers, default=-1) + 1:03d}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def resolve_run_dir(out: str | Path, alg: str, run: str) -> Path:
    """``run`` as a path, ``run_003`` or ``3`` under ``<out>/<alg>``; it must hold params.json."""
    candidates = [Path(run), run_root(out, alg) / run]
    if run.isdigit():
        candidates.append(run_root(out, alg) / f"run_{int(run):03d}")
    for path in candidates:
        if (path / PARAMS_FILE).is_file():
            return path
    raise RunError(f"continue_from_run: no run {run!r} with a {PARAMS_FILE} (looked in {', '.join(map(str, candidates))})")


def case_file(run_dir: Path, case: Case) -> Path:
    """The case's result file; its id comes from a data file, so it is encoded to stay in ``run_dir``."""
    return child_path(run_dir, f"case_{path_component(case.case_id)}.json")


def list_runs(out: str | Path, alg: str) -> list[Path]:
    root = run_root(out, alg)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _RUN.match(p.name) and (p / PARAMS_FILE).is_file())


def hparams_json(hparams: HyperParams) -> dict[str, Any]:
    """Hyperparameters as they read back from params.json (tuples become lists)."""
    return json.loads(json.dumps(hparams.to_dict()))


def _stored_params(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / PARAMS_FILE, what="run parameters")


def resolve_config(config: RunConfig) -> tuple[Path | None, RunConfig]:
    """The run folder to continue (None for a new run) and the configuration to use: a
    continued run keeps the parameters it was started with."""
    if config.continue_from_run is None:
        return None, config
    run_dir = resolve_run_dir(config.out, config.alg, config.continue_from_run)
    stored_config = _stored_params(run_dir).get("config", {})
    for key in RUN_IDENTITY:
        given = getattr(config, key)
        if key == "data_file" and given is not None:  # stored resolved
            given = str(Path(given).resolve())
        if key in stored_config and stored_config[key] != given:
            log.warning("Continuing %s with its stored %s=%r (not %r)", run_dir, key, stored_config[key], getattr(config, key))
    return run_dir, dataclasses.replace(config, **{k: stored_config[k] for k in RUN_IDENTITY if k in stored_config})


def start_run(run_dir: Path | None, config: RunConfig, hparams: HyperParams, extra: dict[str, Any]) -> Path:
    """Create a new run folder with params.json, or check a continued run's hyperparameters."""
    if run_dir is None:
        if distributed.is_main():
            run_dir = new_run_dir(config.out, config.alg)
            write_json(run_dir / PARAMS_FILE, {"config": dataclasses.asdict(config), "hparams": hparams.to_dict(), **extra})
        return distributed.broadcast(run_dir)
    if _stored_params(run_dir).get("hparams") != hparams_json(hparams):
        raise RunError(f"continue_from_run: {run_dir} was run with other hyperparameters; start a new run")
    return run_dir


__all__ = ["PARAMS_FILE", "RUN_IDENTITY", "RunConfig", "RunError", "case_file", "hparams_json", "list_runs", "new_run_dir",
           "resolve_config", "resolve_run_dir", "run_root", "start_run"]
