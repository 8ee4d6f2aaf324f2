"""Target vectors cached on disk, one file per request (the paper's ``--use_cache``).

A request's target vector depends on the model's weights, the request, the context
templates, the layer it is optimised at and the optimisation settings, not on the other
requests of its batch (each request's loss only reaches its own delta). The file name hashes
all of those, so methods with the same settings (MEMIT, AlphaEdit) share files, and a change
of any part is a miss. The model part is a hash of a strided sample of every parameter: an
edit (MEMIT, ROME and fine-tuning change every element of the matrices they touch) changes
it, so a target computed on an edited model is never taken for the unedited model's, nor the
reverse, and sequential edits stay correct without being told.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from memit.editing.context import ContextTemplates
from memit.editing.hparams import ZOptimizationParams
from memit.requests import EditRequest
from memit.utils.devices import device_label
from memit.utils.io import atomic_path, memit_home

# The settings of the optimisation that change its result.
Z_FIELDS = ("v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "fact_token")
Z_FIELDS_ADDED = {"z_early_stop": "loss", "z_stop_margin": 0.0, "z_prompt_forms": {"raw": 1.0}}
SAMPLES_PER_PARAMETER = 4096


def default_target_cache() -> Path:
    return memit_home() / "targets"


def weights_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of every parameter's name and a strided sample of its values (offloaded
    parameters, which no edit can change, are left out)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.device.type == "meta":
                continue
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // SAMPLES_PER_PARAMETER)]
            digest.update(name.encode())
            digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class TargetCache:
    """The cached target vectors of one setting (model state, templates, layer, hyperparameters)."""

    def __init__(
        self,
        root: str | Path,
        model: PreTrainedModel,
        hparams: ZOptimizationParams,
        templates: ContextTemplates,
        layer: int,
        init_module: str,
        autocast: bool,
    ):
        self.root = Path(root)
        self.device = device_label(model)
        self.setting = {
            "weights": weights_fingerprint(model),
            "z": {name: getattr(hparams, name) for name in Z_FIELDS}
            # Settings added later enter the key only when changed, so earlier files stay valid.
            | {name: getattr(hparams, name) for name, default in Z_FIELDS_ADDED.items() if getattr(hparams, name) != default},
            "templates": templates,
            "layer": layer,
            "init_module": init_module,
            "autocast": autocast,
        }

    def path(self, request: EditRequest) -> Path:
        what = {**self.setting, "request": [request.prompt, request.subject, request.target_new]}
        if request.questions and self.setting["z"].get("z_prompt_forms", {}).get("question"):
            what["questions"] = list(request.questions)
        key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(init, delta, final_loss)`` (the loss of shape (1,)) if cached."""
        path = self.path(request)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return tensors["init"], tensors["delta"], tensors["final_loss"]

    def save(self, request: EditRequest, init: torch.Tensor, delta: torch.Tensor, final_loss: torch.Tensor, seconds: float) -> None:
        """``seconds``: what computing this request's vector cost (its share of its batch), on
        the device the file records."""
        tensors = {"init": init, "delta": delta, "final_loss": final_loss.reshape(1)}
        with atomic_path(self.path(request)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"seconds": f"{seconds:.4f}", "device": self.device})


def cache_cost(root: str | Path) -> dict[str, tuple[int, float]]:
    """Per device (`device_label`; ``unrecorded`` for files written before the device
    was recorded): how many target vectors a cache folder holds and the seconds their
    computation took (files written before the seconds were recorded count as none)."""
    cost: dict[str, tuple[int, float]] = {}
    for path in Path(root).rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        device = metadata.get("device", "unrecorded")
        count, seconds = cost.get(device, (0, 0.0))
        cost[device] = (count + 1, seconds + float(metadata.get("seconds", 0.0)))
    return cost
