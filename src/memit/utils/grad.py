"""Temporary gradient and precision settings for a model."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from memit.utils.devices import warn_if_cpu_bfloat16_is_slow


@contextlib.contextmanager
def trainable_only(model: nn.Module, params: Iterable[nn.Parameter] = ()) -> Iterator[None]:
    """Gradients for ``params`` only (none by default: backward then computes just the
    activations' gradients); the previous flags come back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    for p, _ in flags:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def bf16_autocast(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the device type of ``device`` (the model's), when ``enabled``."""
    if not enabled:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if device_type == "cpu":
        warn_if_cpu_bfloat16_is_slow("bfloat16 autocast (--bf16)")
    return torch.autocast(device_type, dtype=torch.bfloat16)
