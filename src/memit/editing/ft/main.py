"""FT baselines: Adam on the MLP output projection weight(s) of the chosen layers, minimising
the NLL of ``target_new`` after each filled rewrite prompt; everything else stays frozen."""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PreTrainedModel

from memit.editing.base import Editor, EditTask
from memit.editing.common import restored_weights
from memit.editing.ft.hparams import FTHyperParams, FTLHyperParams
from memit.editing.prompts import TargetBatch
from memit.utils.grad import bf16_autocast, trainable_only
from memit.utils.progress import progress

log = logging.getLogger(__name__)

# The reference stops once the mean loss over an epoch falls below this, and skips the
# update of a batch whose loss already does.
STOP_LOSS = 1e-2


class FTEditor(Editor):
    name = "FT"
    hparams_class = FTHyperParams
    hparams: FTHyperParams

    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        model, tok, requests = task.model, task.tok, task.requests
        hp = self.hparams
        names = [task.layout.weight_name(layer) for layer in hp.layers]
        params = {name: model.get_parameter(name) for name in names}
        # Adam steps each tuned weight in float32: a half-precision weight gets a float32 copy
        # (in float16 Adam's squared-gradient state underflows and its epsilon rounds to zero).
        masters = {name: p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True) for name, p in params.items()}
        batches = [
            TargetBatch.of(tok, [(r.filled_prompt(), r.target_new) for r in requests[i : i + hp.batch_size]], model.device)
            for i in range(0, len(requests), hp.batch_size)
        ]
        decay = hp.decay_for(len(requests))
        log.info("%s: tuning %s with lr %g, weight decay %g, norm bound %s", self.name, names, hp.lr, decay, hp.norm_constraint)
        # The weights before tuning: the norm bound's centre, the deltas' base, and what the
        # model gets back (one copy of the tuned matrices, not two).
        with restored_weights(model, names) as originals, trainable_only(model, list(params.values())):
            optimizer = torch.optim.Adam(list(masters.values()), lr=hp.lr, weight_decay=decay)
            for step in progress(range(hp.num_steps), desc=f"{self.name} steps", unit="steps", logger=log, leave=False):
                mean_loss = sum(self._train_batch(model, batch, optimizer, params, masters, originals) * batch.n_sequences for batch in batches) / len(requests)
                log.debug("step %d: loss %.4f", step, mean_loss)
                if mean_loss < STOP_LOSS:
                    break
            log.info("%s: final loss %.4f after %d step(s)", self.name, mean_loss, step + 1)
            return {name: (p.detach().float() - originals[name].float()) for name, p in params.items()}

    def _train_batch(
        self,
        model: PreTrainedModel,
        batch: TargetBatch,
        optimizer: torch.optim.Optimizer,
        params: dict[str, nn.Parameter],
        masters: dict[str, torch.Tensor],
        originals: dict[str, torch.Tensor],
    ) -> float:
        optimizer.zero_grad()
        for p in params.values():
            p.grad = None
        with bf16_autocast(self.options.autocast, model.device):
            loss = batch.nll(model(**batch.inputs).logits)
        if loss.item() >= STOP_LOSS:
            loss.backward()
            for name, master in masters.items():
                master.grad = params[name].grad.float()
            optimizer.step()
        bound = self.hparams.norm_constraint
        with torch.no_grad():
            for name, master in masters.items():
                if bound is not None:
                    original = originals[name].float()
                    master.copy_(torch.clamp(master, min=original - bound, max=original + bound))
                params[name].copy_(master)
        return float(loss.item())


class FTLEditor(FTEditor):
    name = "FT-L"
    hparams_class = FTLHyperParams
    hparams: FTLHyperParams
