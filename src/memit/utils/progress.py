"""Progress of long steps: a tqdm bar in a terminal, and otherwise (a log file, CI, a
background run) a ``logging`` line at most every ``interval`` seconds, such as

    INFO memit.evaluation.runner: post-edit scoring: 12/50 cases (24%), 05:02 elapsed, about 15:57 left

and a last line when the step ends. Steps shorter than ``interval`` log nothing.
``MEMIT_PROGRESS_INTERVAL`` (seconds) overrides the interval."""
from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any, Iterable

from tqdm.auto import tqdm as auto_tqdm
from tqdm.autonotebook import tqdm as notebook_or_std_tqdm
from tqdm.std import tqdm as std_tqdm

ENV_INTERVAL = "MEMIT_PROGRESS_INTERVAL"
# Set on progress records, so that a handler can let them through at a higher level.
RECORD_FLAG = "memit_progress"


class LoggingProgress(std_tqdm):
    """A tqdm whose display is a log line: tqdm keeps the counts and the timing
    (``mininterval`` = the interval, ``delay`` = the interval), this class only words them."""

    monitor_interval = 0  # no monitor thread: with miniters=1 it would never act

    def __init__(self, *args: Any, logger: logging.Logger, **kwargs: Any):
        self._logger = logger
        self._logged_n = kwargs.get("initial", 0)
        self._closing = False
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        complete = self.total is not None and self.n >= self.total
        # A finished step is reported once, by close().
        if self.n != self._logged_n and (self._closing or not complete):
            self._logged_n = self.n
            self._logger.info("%s", self.message(), extra={RECORD_FLAG: True})
        return True

    def close(self) -> None:
        self._closing = True
        super().close()

    def message(self) -> str:
        d = self.format_dict
        n, total, elapsed = d["n"], d["total"], d["elapsed"]

        def count(x: float) -> str:  # "12", or with unit_scale "1.91MB"
            return self.format_sizeof(x, self.unit, d["unit_divisor"]) if d["unit_scale"] else str(x)

        unit = "" if d["unit_scale"] else f" {self.unit}"
        text = f"{self.desc}: {count(n)}"
        text += f"/{count(total)}{unit} ({100 * n / total:.0f}%)" if total else unit
        text += f", {self.format_interval(elapsed)} elapsed"
        if self._closing:
            return text + (", stopped" if total and n < total else ", done")
        rate = (n - d["initial"]) / elapsed if elapsed else 0
        if total and rate:
            text += f", about {self.format_interval((total - n) / rate)} left"
        return text


def progress_interval(default: float = 60.0) -> float:
    """Seconds between progress lines: ``MEMIT_PROGRESS_INTERVAL`` if set, else ``default``."""
    try:
        return float(os.environ.get(ENV_INTERVAL, default))
    except ValueError:
        return default


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str,
    unit: str = "it",
    logger: logging.Logger | str | None = None,
    interval: float = 60.0,
    **kwargs: Any,
) -> std_tqdm:
    """A tqdm bar over ``iterable`` (or updated by hand with ``.update(n)``; also a context
    manager). In a terminal (or notebook) it is ``tqdm.auto.tqdm``; otherwise progress lines
    go to ``logger`` (default: the calling module's logger) at INFO at most every
    ``interval`` seconds. Other keyword arguments (``unit_scale``, ``initial``, ``disable``...)
    go to tqdm."""
    kwargs.setdefault("disable", False)
    in_notebook = notebook_or_std_tqdm is not std_tqdm
    if in_notebook or sys.stderr is not None and sys.stderr.isatty():
        return auto_tqdm(iterable, total=total, desc=desc, unit=unit, **kwargs)
    if not isinstance(logger, logging.Logger):
        logger = logging.getLogger(logger or sys._getframe(1).f_globals.get("__name__", "memit"))
    interval = progress_interval(interval)
    # display() logs instead of writing: tqdm's own output goes nowhere.
    return LoggingProgress(
        iterable, total=total, desc=desc, unit=unit, logger=logger, file=io.StringIO(),
        mininterval=interval, delay=interval, miniters=1, **kwargs,
    )


def show_progress_lines(handlers: Iterable[logging.Handler], package: str = "memit") -> None:
    """Let the progress lines of ``package`` loggers through ``handlers`` while their other
    INFO and DEBUG records stay hidden: for a command line that shows only warnings."""
    logging.getLogger(package).setLevel(logging.INFO)

    def keep(record: logging.LogRecord) -> bool:
        ours = record.name == package or record.name.startswith(package + ".")
        return not ours or record.levelno >= logging.WARNING or getattr(record, RECORD_FLAG, False)

    for handler in handlers:
        handler.addFilter(keep)


__all__ = ["ENV_INTERVAL", "LoggingProgress", "progress", "progress_interval", "show_progress_lines"]
