"""MEND's editor network: per edited weight, a residual low-rank MLP over each token's
standardised [key u; output gradient δ], whose outputs (ũ, δ̃) give ΔW = −lr Σ δ̃ ũᵀ.

Saved the Hugging Face way: ``mend_config.json`` and ``mend_network.safetensors``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from memit.utils.io import atomic_path, read_json, write_json

CONFIG_FILE = "mend_config.json"
WEIGHTS_FILE = "mend_network.safetensors"

# weight name -> (keys (tokens, in), output gradients (tokens, out))
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class GradientTransform(nn.Module):
    """One weight's network: standardise, add a low-rank ReLU MLP of the input (zero at the
    start, so training begins from plain gradient descent), split into (ũ, δ̃)."""

    def __init__(self, key_dim: int, grad_dim: int, rank: int):
        super().__init__()
        self.key_dim = key_dim
        width = key_dim + grad_dim
        # Running mean and sum of squared deviations of the inputs, updated in training.
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("squares", torch.zeros(width, dtype=torch.float64))
        self.down = nn.Linear(width, rank)
        self.up = nn.Linear(rank, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @torch.no_grad()
    def observe(self, keys: torch.Tensor, grads: torch.Tensor) -> None:
        """Fold a batch of tokens into the running statistics (Chan et al.'s parallel update)."""
        x = torch.cat([keys, grads], dim=-1).double()
        n, batch_mean = x.shape[0], x.mean(0)
        total = self.count + n
        shift = batch_mean - self.mean
        self.squares += ((x - batch_mean) ** 2).sum(0) + shift**2 * self.count * n / total
        self.mean += shift * n / total
        self.count.fill_(float(total))

    def forward(self, keys: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([keys, grads], dim=-1).float()
        std = (self.squares / (self.count - 1).clamp_min(1)).sqrt().float().clamp_min(1e-8)
        z = (x - self.mean.float()) / std
        z = z + self.up(torch.relu(self.down(z)))
        return z[:, : self.key_dim], z[:, self.key_dim :]


class MENDNetwork(nn.Module):
    """The transforms of all edited weights and their learned step sizes."""

    def __init__(self, dims: dict[str, tuple[int, int]], rank: int, edit_lr: float, metadata: dict[str, Any] | None = None):
        super().__init__()
        self.dims = dims
        self.rank = rank
        self.metadata = dict(metadata or {})
        self.transforms = nn.ModuleList(GradientTransform(k, g, rank) for k, g in dims.values())
        self.log_lrs = nn.Parameter(torch.full((len(dims),), math.log(edit_lr)))

    @property
    def weight_names(self) -> list[str]:
        return list(self.dims)

    def observe(self, factors: Factors) -> None:
        for name, transform in zip(self.weight_names, self.transforms):
            transform.observe(*factors[name])

    def weight_deltas(self, factors: Factors) -> dict[str, torch.Tensor]:
        """ΔW (out, in) of each weight from the edit's gradient factors."""
        deltas = {}
        for i, (name, transform) in enumerate(zip(self.weight_names, self.transforms)):
            keys, grads = transform(*factors[name])
            deltas[name] = -self.log_lrs[i].exp() * grads.T @ keys
        return deltas

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(folder / CONFIG_FILE, {"dims": self.dims, "rank": self.rank, **self.metadata})

    @classmethod
    def load(cls, folder: str | Path) -> "MENDNetwork":
        folder = Path(folder)
        config = read_json(folder / CONFIG_FILE, what="MEND network config")
        dims = {name: tuple(d) for name, d in config.pop("dims").items()}
        network = cls(dims, config.pop("rank"), 1.0, config)
        network.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        return network.eval()
