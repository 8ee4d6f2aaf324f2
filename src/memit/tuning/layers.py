"""Candidate edit-layer windows from the traced MLP effect at the last subject token."""
from __future__ import annotations

from memit.errors import InputError


def candidate_windows(effect: list[float], width: int) -> list[list[int]]:
    """Windows of ``width`` consecutive layers around the peak of ``effect`` (one value per
    layer: the average indirect effect of restoring the MLP outputs of a window of layers
    centred there): the window ending at the peak (the paper's GPT-J choice), the one centred
    on it, and the one starting at it; each shifted inside the model, duplicates dropped.
    Which of them edits best is measured, not assumed."""
    n_layers = len(effect)
    if not 1 <= width <= n_layers:
        raise InputError(f"num_layers: a window of {width} layers does not fit a model of {n_layers} layers")
    peak = max(range(n_layers), key=effect.__getitem__)
    windows: list[list[int]] = []
    for start in (peak - width + 1, peak - width // 2, peak):
        start = min(max(start, 0), n_layers - width)
        window = list(range(start, start + width))
        if window not in windows:
            windows.append(window)
    return windows
