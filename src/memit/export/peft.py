"""Deltas as a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Each edited weight's change ΔW (out x in) is factorised by an SVD in float64,
ΔW ≈ B A with B = U_r sqrt(S_r) (out x r) and A = sqrt(S_r) V_rᵀ (r x in), and written with
``lora_alpha = r`` so that PEFT's scaling alpha / r is 1 and B A is added as it is. A MEMIT
update of n edits has rank at most n, so the exact adapter is small; a rank or energy target
truncates it, and the report says what that costs.

The files are plain safetensors and JSON in PEFT's layout: writing them needs no peft install.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from memit.errors import InputError
from memit.export.common import efficacy_with, unedited
from memit.utils.io import atomic_dir, write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REPORT_FILE = "export_report.json"
# PEFT's key prefix for a causal LM: PeftModel.base_model (LoraModel) .model (the transformers model).
KEY_PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    """One module's factors: ``B @ A`` is its ΔW in Linear orientation (out x in)."""

    module: str
    A: torch.Tensor
    B: torch.Tensor
    exact_rank: int
    # ||ΔW - B A||_F / ||ΔW||_F, with the factors as written (float32).
    relative_error: float
    # Share of ΔW's squared Frobenius norm in the kept singular values.
    energy_kept: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, fan_in_fan_out: bool) -> torch.Tensor:
        """The change these factors make to the parameter, in the parameter's own shape."""
        product = self.B @ self.A
        return product.T if fan_in_fan_out else product


@dataclass
class ModuleReport:
    shape: list[int]
    rank: int
    exact_rank: int
    relative_error: float
    energy_kept: float


def exact_rank(singular: torch.Tensor, shape: tuple[int, int]) -> int:
    """The numerical rank of a matrix stored in float32 (NumPy's ``matrix_rank`` rule):
    singular values above S_max · max(m, n) · eps(float32). A delta is computed and applied
    in float32 at best, so components below that bound are indistinguishable from its rounding
    noise; dropping them changes the matrix by less than that bound in spectral norm (the
    report gives the error, far under the float32 weights' own rounding for real edits)."""
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return 0
    tolerance = float(singular[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((singular > tolerance).sum())


def chosen_rank(singular: torch.Tensor, exact: int, rank: int | None, energy: float | None) -> int:
    """The rank to keep: ``rank`` as given, the fewest components holding ``energy`` of the
    squared Frobenius norm, or the exact rank."""
    if rank is not None:
        return rank
    if energy is not None:
        squares = singular.double() ** 2
        cumulative = squares.cumsum(0) / squares.sum()
        return min(int((cumulative < energy - 1e-12).sum()) + 1, exact)
    return exact


def factorise(module: str, delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LoraFactors | None:
    """LoRA factors of ``delta`` (out x in); None when it is zero (nothing to adapt)."""
    matrix = delta.detach().to("cpu", torch.float64)
    limit = min(matrix.shape)
    if rank is not None and rank > limit:
        raise InputError(f"rank: {rank} is larger than {module} allows (its delta is {tuple(matrix.shape)}, rank at most {limit})")
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    exact = exact_rank(S, tuple(matrix.shape))
    if exact == 0:
        return None
    r = chosen_rank(S, exact, rank, energy)
    root = S[:r].sqrt()
    B = (U[:, :r] * root).to(torch.float32).contiguous()
    A = (root[:, None] * Vh[:r]).to(torch.float32).contiguous()
    norm = float(torch.linalg.norm(matrix))
    error = float(torch.linalg.norm(matrix - B.double() @ A.double())) / norm
    energy_kept = float((S[:r] ** 2).sum() / (S**2).sum())
    return LoraFactors(module, A, B, exact, error, energy_kept)


def module_layouts(deltas: Any, model: nn.Module | None) -> dict[str, bool]:
    """Module name -> ``fan_in_fan_out`` (True for GPT-2's Conv1D, which stores its weight as
    in x out) for every edited parameter; anything but a Linear or Conv1D weight is refused,
    since a LoRA adapter only adds B A to such weights."""
    from transformers.pytorch_utils import Conv1D

    layouts: dict[str, bool] = {}
    for name, delta in deltas.deltas.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or delta.dim() != 2:
            raise InputError(f"peft: the delta of {name} is not a matrix weight; a LoRA adapter can only change Linear (or Conv1D) weights")
        if model is None:
            # Without the model, a 2-D weight is taken to be a Linear's (out x in).
            layouts[module] = False
            continue
        layer = model.get_submodule(module)
        if isinstance(layer, nn.Linear):
            layouts[module] = False
        elif isinstance(layer, Conv1D):
            layouts[module] = True
        else:
            raise InputError(f"peft: {module} is a {type(layer).__name__}; PEFT LoRA exports support Linear and Conv1D layers")
    if len(set(layouts.values())) > 1:
        # PEFT's fan_in_fan_out is one flag for the whole adapter.
        raise InputError("peft: the deltas change both Linear and Conv1D layers; one LoRA adapter cannot hold both orientations")
    return layouts


def adapter_config(factors: list[LoraFactors], fan_in_fan_out: bool, base_model: str) -> dict[str, Any]:
    """PEFT's LoraConfig as JSON. ``r`` is the largest rank; modules of other ranks get
    ``rank_pattern`` / ``alpha_pattern`` entries (exact names, regex-escaped, as PEFT matches
    them with ``re.match``), each with alpha = its rank, so every module's scaling is 1 (a loader
    that ignores the patterns, as vLLM does, still scales by alpha / r = 1)."""
    top = max(f.rank for f in factors)
    pattern = {re.escape(f.module): f.rank for f in factors if f.rank != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        # Exact module names: PEFT matches a list entry by equality or as a dotted suffix.
        "target_modules": sorted(f.module for f in factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def lora_factors(deltas: Any, layouts: dict[str, bool], rank: int | None, energy: float | None) -> tuple[list[LoraFactors], list[str]]:
    """Factors of every nonzero delta, and the modules whose delta is zero."""
    factors, zero = [], []
    for name, delta in deltas.deltas.items():
        module = name.rpartition(".")[0]
        # Conv1D stores in x out; LoRA's B A is out x in either way.
        found = factorise(module, delta.T if layouts[module] else delta, rank, energy)
        (factors.append(found) if found is not None else zero.append(module))
    if not factors:
        raise InputError("deltas: every delta is zero; there is nothing to export")
    return factors, zero


def export_peft(
    deltas: Any,
    out_dir: str | Path,
    model: nn.Module | None = None,
    tok: Any = None,
    rank: int | None = None,
    energy: float | None = None,
) -> dict[str, Any]:
    """Write ``deltas`` as a PEFT LoRA adapter in ``out_dir`` with ``export_report.json``
    beside it (ranks, reconstruction errors, sizes; with a rank or energy target and the
    model and tokenizer, the efficacy of the truncated adapter against the exact deltas)."""
    _check_targets(rank, energy)
    if model is not None:
        deltas.check(model)
    layouts = module_layouts(deltas, model)
    factors, zero = lora_factors(deltas, layouts, rank, energy)
    fan_in_fan_out = any(layouts.values())
    base_model = getattr(getattr(model, "config", None), "_name_or_path", "") or deltas.manifest.get("model_name", "")
    tensors = {}
    for f in factors:
        tensors[f"{KEY_PREFIX}{f.module}.lora_A.weight"] = f.A
        tensors[f"{KEY_PREFIX}{f.module}.lora_B.weight"] = f.B
    report = _report(deltas, factors, zero, rank, energy)
    if (rank is not None or energy is not None) and model is not None and tok is not None:
        truncated = {f"{f.module}.weight": f.delta(layouts[f.module]) for f in factors}
        with unedited(deltas, model):
            report["efficacy"] = {
                "exact_deltas": efficacy_with(model, tok, deltas, dict(deltas.deltas)),
                "adapter": efficacy_with(model, tok, deltas, truncated),
            }
    with atomic_dir(out_dir) as folder:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(folder / CONFIG_FILE, adapter_config(factors, fan_in_fan_out, base_model))
        report["adapter_bytes"] = (folder / WEIGHTS_FILE).stat().st_size
        write_json(folder / REPORT_FILE, report)
    _log_summary(report)
    return report


def _check_targets(rank: int | None, energy: float | None) -> None:
    if rank is not None and energy is not None:
        raise InputError("rank/energy: give a rank or an energy target, not both")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"rank: must be a positive integer, got {rank!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InputError(f"energy: must be in (0, 1], got {energy!r}")


def _report(deltas: Any, factors: list[LoraFactors], zero: list[str], rank: int | None, energy: float | None) -> dict[str, Any]:
    modules = {
        f.module: asdict(ModuleReport(list(f.B.shape[:1]) + list(f.A.shape[1:]), f.rank, f.exact_rank, f.relative_error, f.energy_kept))
        for f in factors
    }
    return {
        "format": "peft",
        "truncation": {"rank": rank, "energy": energy} if rank is not None or energy is not None else None,
        "exact_rank_rule": "singular values > S_max * max(out, in) * eps(float32)",
        "modules": modules,
        "zero_modules": zero,
        "max_relative_error": max(f.relative_error for f in factors),
        "full_matrices_bytes": sum(d.numel() * d.element_size() for d in deltas.deltas.values()),
        "requests": len(deltas.manifest.get("requests") or []),
    }


def _log_summary(report: dict[str, Any]) -> None:
    ranks = sorted({m["rank"] for m in report["modules"].values()})
    log.info(
        "PEFT adapter: %d module(s), rank(s) %s, max relative error %.3g, %d bytes against %d for the full matrices",
        len(report["modules"]), ranks, report["max_relative_error"], report["adapter_bytes"], report["full_matrices_bytes"],
    )
    if "efficacy" in report:
        log.info("Efficacy on the edits' prompts: exact deltas %s, truncated adapter %s", *report["efficacy"].values())


def read_config(folder: str | Path) -> dict[str, Any]:
    """An adapter's config (for tests and callers that inspect an export)."""
    return json.loads((Path(folder) / CONFIG_FILE).read_text())
