"""Plots of causal traces: one fact's heat map, the data set's average effect per token
position and layer, and the last subject token's effect per layer for every kind."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from memit.tracing.causal_trace import Trace
from memit.utils.io import atomic_path

_TITLES = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}
_COLOURS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _window_label(kind: str, window: int) -> str:
    return "" if kind == "hidden" else f" (window of {window} layers)"


def plot_trace(trace: Trace, path: Path) -> None:
    """p(answer) after restoring each (token, layer) state; subject tokens marked with *."""
    labels = [t + ("*" if trace.subject_range[0] <= i < trace.subject_range[1] else "") for i, t in enumerate(trace.tokens)]
    fig = Figure(figsize=(6, 0.3 * len(labels) + 1.2))
    ax = fig.subplots()
    image = ax.pcolormesh(trace.scores, cmap=_COLOURS[trace.kind], vmin=trace.low)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(labels))], labels)
    ax.set_xlabel("layer")
    ax.set_title(f"Restoring the {_TITLES[trace.kind]}{_window_label(trace.kind, trace.window)}", fontsize=9)
    fig.colorbar(image, ax=ax, label=f"p({trace.answer.strip()!r})")
    _save(fig, path)


def plot_average(average: dict[str, Any], path: Path) -> None:
    """The average indirect effect per token position (rows) and layer (columns)."""
    positions = [p for p in average["positions"] if average["effect"][p] is not None]
    fig = Figure(figsize=(6, 0.35 * len(positions) + 1.4))
    ax = fig.subplots()
    image = ax.pcolormesh([average["effect"][p] for p in positions], cmap=_COLOURS[average["kind"]], vmin=0)
    ax.invert_yaxis()
    ax.set_yticks([i + 0.5 for i in range(len(positions))], positions)
    ax.set_xlabel("layer")
    kind = average["kind"]
    ax.set_title(f"Average indirect effect, {_TITLES[kind]}{_window_label(kind, average['window'])}, "
                 f"{average['num_traces']} facts", fontsize=9)
    fig.colorbar(image, ax=ax, label="p(answer) restored − corrupted")
    _save(fig, path)


def plot_last_subject(averages: dict[str, dict[str, Any]], path: Path) -> None:
    """The average indirect effect at the last subject token against the layer, per kind."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    colours = {"hidden": "purple", "mlp": "green", "attn": "red"}
    for kind, average in averages.items():
        effect = average["effect"]["last subject"]
        ax.plot(range(len(effect)), effect, label=_TITLES[kind] + _window_label(kind, average["window"]), color=colours[kind])
    ax.set_xlabel("layer")
    ax.set_ylabel("average indirect effect")
    ax.set_title("At the last subject token", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


__all__ = ["plot_average", "plot_last_subject", "plot_trace"]
