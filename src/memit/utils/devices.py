"""Where computations run when a model's layers may sit on different devices."""
from __future__ import annotations

import functools
import logging
import platform

import torch

log = logging.getLogger(__name__)


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


@functools.cache
def cpu_lacks_bfloat16_units() -> bool:
    """True on an x86 CPU without AVX512_BF16 or AMX, where torch runs bfloat16 matrix products
    in software: 67 times slower than float32 on a 2-core AVX2 AMD EPYC (512x576 by 576x1536,
    one thread: 747 against 11 ms). Other CPUs are not judged (False)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@functools.cache
def warn_if_cpu_bfloat16_is_slow(what: str) -> None:
    """Log once per process (per ``what``) that ``what`` computes in bfloat16 on a CPU without
    bfloat16 units."""
    if cpu_lacks_bfloat16_units():
        log.warning("%s on a CPU without bfloat16 units (no AVX512_BF16 or AMX): torch computes its matrix "
                    "products in software, tens of times slower than float32; use float32 on this machine", what)
