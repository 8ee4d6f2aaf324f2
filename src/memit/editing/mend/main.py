"""MEND as an editing method: the trained network turns the edit's gradient into weight deltas."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import PreTrainedModel

from memit.editing.base import Editor, EditTask
from memit.editing.mend.gradients import gradient_factors
from memit.editing.mend.hparams import MENDHyperParams
from memit.editing.mend.network import CONFIG_FILE, MENDNetwork
from memit.editing.prompts import TargetBatch
from memit.errors import InputError, MissingFileError
from memit.models.layout import ModelLayout
from memit.models.loading import model_fingerprint
from memit.utils.io import memit_home

log = logging.getLogger(__name__)


def default_network_dir(model: PreTrainedModel) -> Path:
    return memit_home() / "mend" / model_fingerprint(model)


class MENDEditor(Editor):
    name = "MEND"
    hparams_class = MENDHyperParams
    hparams: MENDHyperParams
    # Loaded on the first edit and kept for the editor's later edits.
    _network: MENDNetwork | None = None

    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        network = self.network(task.model, task.layout)
        pairs = [(r.filled_prompt(), r.target_new) for r in task.requests]
        factors = gradient_factors(task.model, task.layout, self.hparams.layers, TargetBatch.of(task.tok, pairs, task.model.device))
        # The network runs where the first edited weight is (layers may be spread over devices).
        device = task.model.get_parameter(network.weight_names[0]).device
        factors = {name: tuple(f.to(device) for f in pair) for name, pair in factors.items()}
        with torch.no_grad():
            deltas = network.to(device).weight_deltas(factors)
        return {name: task.layout.as_weight(delta).float() for name, delta in deltas.items()}

    def network(self, model: PreTrainedModel, layout: ModelLayout) -> MENDNetwork:
        """The trained network of ``hparams.network`` (default: this model's), loaded once."""
        if self._network is None:
            folder = Path(self.hparams.network) if self.hparams.network else default_network_dir(model)
            if not (folder / CONFIG_FILE).is_file():
                raise MissingFileError(
                    f"hparams.network: no trained MEND network in {folder}; train one with "
                    "`memit train-mend --model MODEL --data-file TRAIN.json` (or set 'network' to its folder)"
                )
            network = MENDNetwork.load(folder)
            wanted = [layout.weight_name(layer) for layer in self.hparams.layers]
            if network.weight_names != wanted:
                raise InputError(f"hparams.network: {folder} edits {network.weight_names}, the hyperparameters ask for {wanted}")
            if network.metadata.get("model_fingerprint") != model_fingerprint(model):
                log.warning("MEND: the network in %s was trained for another model", folder)
            log.info("MEND: network from %s (%s)", folder, network.metadata.get("trained", "untrained"))
            self._network = network
        return self._network
