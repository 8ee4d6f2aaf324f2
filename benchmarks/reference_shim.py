"""Lets the paper's code (a checkout of kmeng01/memit) run where it was not written to:
``install()``, called by benchmarks/scale_gpu_reference.py before it imports that code, makes

* ``datasets.load_dataset`` (its statistics read Wikipedia from the hub) return the packaged
  Wikipedia sample, the corpus memit's own run reads;
* its statistics' download of precomputed files from the authors' server fail at once;
* without CUDA, its ``.cuda()`` and ``device="cuda"`` calls stay on the CPU (so the tests run
  the same path on a CPU).
"""
from __future__ import annotations

import gzip
import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import torch

CORPUS = Path(os.environ.get("MEMIT_REFERENCE_CORPUS", Path(__file__).resolve().parents[1] / "src" / "memit" / "data" / "wikipedia_en_2015_sample2000.jsonl.gz"))


class _Rows:
    """The corpus as the indexable ``train`` split the paper's ``TokenizedDataset`` reads."""

    def __init__(self, path: Path):
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            self.rows = [{"text": json.loads(line)["text"]} for line in f]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def _load_dataset(*_args, **_kwargs) -> dict:
    return {"train": _Rows(CORPUS)}


def _no_download(url: str, *_args, **_kwargs) -> None:
    raise OSError(f"no network for {url}")


def _install_datasets() -> None:
    module = types.ModuleType("datasets")
    module.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    module.load_dataset = _load_dataset
    sys.modules["datasets"] = module


def _keep_on_cpu() -> None:
    def cpu(device):
        if isinstance(device, str) and device.startswith("cuda") or isinstance(device, torch.device) and device.type == "cuda":
            return torch.device("cpu")
        return device

    tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to
    torch.Tensor.to = lambda self, *a, **k: tensor_to(self, *(cpu(x) for x in a), **{n: cpu(v) for n, v in k.items()})
    torch.nn.Module.to = lambda self, *a, **k: module_to(self, *(cpu(x) for x in a), **{n: cpu(v) for n, v in k.items()})
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.empty_cache = lambda: None
    for name in ("tensor", "zeros", "ones", "empty", "arange", "full", "randn", "rand", "zeros_like", "ones_like"):
        factory = getattr(torch, name)

        def on_cpu(*a, _factory=factory, **k):
            if "device" in k:
                k["device"] = cpu(k["device"])
            return _factory(*a, **k)

        setattr(torch, name, on_cpu)


def install() -> None:
    _install_datasets()
    torch.hub.download_url_to_file = _no_download
    if not torch.cuda.is_available():
        _keep_on_cpu()
