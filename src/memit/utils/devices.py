"""Where computations run when a model's layers may sit on different devices."""
from __future__ import annotations

import torch


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 solves run: ``device`` itself, or the CPU for a device without float64
    (Apple MPS)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device


def device_label(model: torch.nn.Module) -> str:
    """Where a model computes: ``cpu``, ``mps`` or ``cuda:<GPU name>`` (a cache filled on a GPU
    costs another time per vector than one filled on CPUs)."""
    device = next(model.parameters()).device
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
