"""Training MEND's network (the paper's objective): after the edit made from a batch's
gradient, the target's NLL on the edit prompt and a rephrase, weighted by ``edit_loss_weight``,
plus the KL divergence of the model's predictions on unrelated prompts from the unedited ones."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.func import functional_call
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.mend.gradients import gradient_factors
from memit.editing.mend.hparams import MENDHyperParams
from memit.editing.mend.network import MENDNetwork
from memit.editing.prompts import TargetBatch
from memit.errors import InputError
from memit.models.layout import ModelLayout
from memit.models.loading import model_fingerprint
from memit.utils.grad import trainable_only
from memit.utils.io import atomic_path
from memit.utils.progress import progress

log = logging.getLogger(__name__)

LOG_EVERY = 100
CHECKPOINT_EVERY = 100
CHECKPOINT_FILE = "training_state.pt"


@dataclass(frozen=True)
class TrainingExample:
    """One training example; data sets make them from their cases (``DatasetSpec.training_example``)."""

    edit: tuple[str, str]  # (prompt, target with its leading space)
    rephrase: tuple[str, str]
    unrelated: str


def train_mend(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    hp: MENDHyperParams,
    examples: list[TrainingExample],
    seed: int = 0,
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = CHECKPOINT_EVERY,
    on_step: Callable[[int], None] | None = None,
) -> MENDNetwork:
    """A network trained for ``hp.train_steps`` steps on random batches of ``examples``.

    With ``checkpoint_dir``, the training state is saved there every ``checkpoint_every``
    steps, and a training started again continues from it exactly (same batches, same
    result); ``on_step(n)`` is called after step n.
    """
    if not examples:
        raise InputError("data-file: no training examples")
    torch.manual_seed(seed)
    weights = {layout.weight_name(layer): layout.mlp_out(model, layer).weight for layer in hp.layers}
    # (in, out) of each weight: as_weight turns the stored orientation into (out, in).
    dims = {name: tuple(layout.as_weight(w).shape[::-1]) for name, w in weights.items()}
    fingerprint = model_fingerprint(model)
    network = MENDNetwork(dims, hp.rank, hp.edit_lr, {"model_fingerprint": fingerprint, "hparams": hp.to_dict()})
    network.to(model.device).train()
    optimizer = torch.optim.Adam([
        {"params": network.transforms.parameters(), "lr": hp.meta_lr},
        {"params": [network.log_lrs], "lr": hp.lr_lr},
    ])
    generator = torch.Generator().manual_seed(seed)
    # What a checkpoint must match to be continued (more steps may be asked for).
    identity = {**hp.to_dict(), "train_steps": None, "network": None, "examples": len(examples), "seed": seed,
                "model_fingerprint": fingerprint}
    first_step = _resume(checkpoint_dir, identity, network, optimizer, generator)
    start, window = time.perf_counter(), []
    with trainable_only(model):
        steps = range(first_step, hp.train_steps)
        for step in progress(steps, initial=first_step, total=hp.train_steps, desc="train MEND", unit="steps", logger=log):
            batch = [examples[i] for i in torch.randint(len(examples), (hp.train_batch_size,), generator=generator)]
            edit_loss, locality = _losses(model, tok, layout, hp, network, weights, batch)
            loss = hp.edit_loss_weight * edit_loss + locality
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 100.0)
            optimizer.step()
            window.append((edit_loss.item(), locality.item()))
            if (step + 1) % LOG_EVERY == 0 or step + 1 == hp.train_steps:
                mean_edit, mean_locality = (sum(v) / len(window) for v in zip(*window))
                log.info("MEND step %d: edit NLL %.3f, locality KL %.4f, step sizes %s", step + 1, mean_edit, mean_locality,
                         [f"{lr:.2e}" for lr in network.log_lrs.exp().tolist()])
                window.clear()
            if checkpoint_dir is not None and (step + 1) % checkpoint_every == 0:
                with atomic_path(checkpoint_dir / CHECKPOINT_FILE) as tmp:
                    torch.save({"identity": identity, "step": step + 1, "network": network.state_dict(),
                                "optimizer": optimizer.state_dict(), "generator": generator.get_state()}, tmp)
            if on_step is not None:
                on_step(step + 1)
    network.metadata["trained"] = {
        "steps": hp.train_steps, "examples": len(examples), "seed": seed, "seconds": round(time.perf_counter() - start),
        "last_edit_nll": round(mean_edit, 4), "last_locality_kl": round(mean_locality, 5),
    }
    return network.eval()


def _resume(
    checkpoint_dir: Path | None,
    identity: dict,
    network: MENDNetwork,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> int:
    """Load the checkpoint into the training objects; returns the step to continue from."""
    path = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if path is None or not path.is_file():
        return 0
    # weights_only: a checkpoint file must not be able to run code when it is read.
    state = torch.load(path, weights_only=True)
    if state["identity"] != identity:
        raise InputError(f"checkpoint: {path} belongs to another training (model, data or hyperparameters); delete it to start again")
    network.load_state_dict(state["network"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    log.info("MEND: continuing the training from step %d (%s)", state["step"], path)
    return state["step"]


def _losses(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    hp: MENDHyperParams,
    network: MENDNetwork,
    weights: dict[str, torch.Tensor],
    batch: list[TrainingExample],
) -> tuple[torch.Tensor, torch.Tensor]:
    device = model.device
    factors = gradient_factors(model, layout, hp.layers, TargetBatch.of(tok, [e.edit for e in batch], device))
    network.observe(factors)
    edited = {name: weights[name] + layout.as_weight(delta).to(weights[name].dtype) for name, delta in network.weight_deltas(factors).items()}
    check = TargetBatch.of(tok, [e.edit for e in batch] + [e.rephrase for e in batch], device)
    edit_loss = check.nll(functional_call(model, edited, args=(), kwargs=check.inputs).logits)
    unrelated = tok([e.unrelated for e in batch], padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        before = torch.log_softmax(model(**unrelated).logits.float(), dim=-1)
    after = torch.log_softmax(functional_call(model, edited, args=(), kwargs=dict(unrelated)).logits.float(), dim=-1)
    mask = unrelated["attention_mask"].bool()
    locality = (before.exp() * (before - after)).sum(-1)[mask].mean()
    return edit_loss, locality
