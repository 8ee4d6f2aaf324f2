"""FT baselines: Adam on the MLP output projection weight(s) of the chosen layers, minimising
the NLL of ``target_new`` after each filled rewrite prompt; everything else stays frozen."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.editing.base import EditTask, Editor, register
from memit.editing.common import restored_weights
from memit.editing.ft.hparams import FTHyperParams, FTLHyperParams
from memit.editing.prompts import target_ids
from memit.requests import EditRequest

log = logging.getLogger(__name__)

# The reference stops once the mean loss over an epoch falls below this, and skips the
# update of a batch whose loss already does.
STOP_LOSS = 1e-2


@dataclass
class _TargetBatch:
    """Prompt + target token ids, right-padded, and where each target token is predicted."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor  # per target token: its sequence, which is its request's index in the batch
    positions: torch.Tensor  # position whose logits predict it
    tokens: torch.Tensor
    n_requests: int


@register
class FTEditor(Editor):
    name = "FT"
    hparams_class = FTHyperParams
    hparams: FTHyperParams

    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        model, tok, requests = task.model, task.tok, task.requests
        hp = self.hparams
        names = [task.layout.weight_name(layer) for layer in hp.layers]
        params = {name: model.get_parameter(name) for name in names}
        originals = {name: p.detach().clone() for name, p in params.items()}
        batches = [
            _target_batch(tok, requests[i : i + hp.batch_size], model.device)
            for i in range(0, len(requests), hp.batch_size)
        ]
        decay = hp.decay_for(len(requests))
        log.info("%s: tuning %s with lr %g, weight decay %g, norm bound %s", self.name, names, hp.lr, decay, hp.norm_constraint)
        with restored_weights(model, names), _trainable_only(model, list(params.values())):
            optimizer = torch.optim.Adam(list(params.values()), lr=hp.lr, weight_decay=decay)
            for step in range(hp.num_steps):
                mean_loss = sum(self._train_batch(model, batch, optimizer, params, originals) * batch.n_requests for batch in batches) / len(requests)
                log.debug("step %d: loss %.4f", step, mean_loss)
                if mean_loss < STOP_LOSS:
                    break
            log.info("%s: final loss %.4f after %d step(s)", self.name, mean_loss, step + 1)
            return {name: (p.detach() - originals[name]).float() for name, p in params.items()}

    def _train_batch(
        self,
        model: PreTrainedModel,
        batch: _TargetBatch,
        optimizer: torch.optim.Optimizer,
        params: dict[str, nn.Parameter],
        originals: dict[str, torch.Tensor],
    ) -> float:
        optimizer.zero_grad()
        with _autocast(self.options.autocast):
            loss = target_nll(model, batch)
        if loss.item() >= STOP_LOSS:
            loss.backward()
            optimizer.step()
        bound = self.hparams.norm_constraint
        if bound is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(torch.clamp(p, min=originals[name] - bound, max=originals[name] + bound))
        return float(loss.item())


@register
class FTLEditor(FTEditor):
    name = "FT-L"
    hparams_class = FTLHyperParams
    hparams: FTLHyperParams


def target_nll(model: PreTrainedModel, batch: _TargetBatch) -> torch.Tensor:
    """Mean over requests of the mean per-token NLL of the target after the prompt."""
    logits = model(**batch.inputs).logits
    log_probs = torch.log_softmax(logits[batch.rows, batch.positions].float(), dim=-1)
    token_nll = -log_probs.gather(1, batch.tokens.unsqueeze(1)).squeeze(1)
    per_request = torch.zeros(batch.n_requests, device=token_nll.device).index_add(0, batch.rows, token_nll)
    counts = torch.bincount(batch.rows, minlength=batch.n_requests).float()
    return (per_request / counts).mean()


def _target_batch(tok: PreTrainedTokenizerBase, requests: list[EditRequest], device: torch.device) -> _TargetBatch:
    sequences, rows, positions, tokens = [], [], [], []
    for r, request in enumerate(requests):
        prompt = tok(request.filled_prompt())["input_ids"]
        target = target_ids(tok, request.target_new)
        sequences.append(prompt + target)
        for offset, token in enumerate(target):
            rows.append(r)
            positions.append(len(prompt) - 1 + offset)
            tokens.append(token)
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return _TargetBatch(
        {"input_ids": ids.to(device), "attention_mask": mask.to(device)},
        as_tensor(rows), as_tensor(positions), as_tensor(tokens), len(requests),
    )


@contextlib.contextmanager
def _trainable_only(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only; the previous flags come back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    for p, _ in flags:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _autocast(enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()
