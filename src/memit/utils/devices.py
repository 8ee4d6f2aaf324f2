"""Where computations run when a model's layers may sit on different devices."""
from __future__ import annotations

import torch


def float64_device(device: torch.device | str) -> torch.device:
    """Where float64 solves run: ``device`` itself, or the CPU for a device without float64
    (Apple MPS)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "mps" else device
