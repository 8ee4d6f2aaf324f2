"""The edits to export: a saved deltas folder, or an edit chain folder (the sum of its batches)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from memit.chain import CHAIN_FILE
from memit.deltas import CONFIG_FILE, WeightDeltas
from memit.errors import InputError, MissingFileError
from memit.utils.io import read_json

log = logging.getLogger(__name__)


def load_edits(directory: str | Path) -> WeightDeltas:
    """The deltas saved in ``directory`` (checked against their checksum), or, for a chain
    folder, one :class:`WeightDeltas` holding the sum of its batches and all their requests."""
    directory = Path(directory)
    if (directory / CHAIN_FILE).is_file():
        return chain_total(directory)
    if (directory / CONFIG_FILE).is_file():
        return WeightDeltas.load(directory)
    raise MissingFileError(f"edits: {directory} holds neither saved deltas ({CONFIG_FILE}) nor an edit chain ({CHAIN_FILE})")


def chain_total(directory: Path) -> WeightDeltas:
    """A chain's batches summed: each weight's total change from the model the chain started on."""
    manifest = read_json(directory / CHAIN_FILE, what="chain manifest")
    if not isinstance(manifest, dict):
        raise InputError(f"chain manifest {directory / CHAIN_FILE}: expected a JSON object")
    batches = manifest.get("batches") or []
    if not batches:
        raise InputError(f"chain: {directory} has no batches; there is nothing to export")
    total: dict[str, torch.Tensor] = {}
    requests: list = []
    dtypes: dict[str, torch.dtype] = {}
    for name in batches:
        batch = WeightDeltas.load(directory / name)
        for param, delta in batch.deltas.items():
            # Summed in float64 so that the order of batches does not round the total.
            total[param] = total[param] + delta.double() if param in total else delta.double()
        requests += batch.manifest.get("requests") or []
        dtypes.update({param: delta.dtype for param, delta in batch.deltas.items()})
    summed = {param: delta.to(dtypes.get(param, torch.float32)) for param, delta in total.items()}
    log.info("Chain %s: %d batches, %d requests, %d edited weights", directory, len(batches), len(requests), len(summed))
    return WeightDeltas(summed, {
        "algorithm": manifest.get("algorithm"),
        "hparams": manifest.get("hparams", {}),
        "requests": requests,
        "model_fingerprint": manifest.get("model_fingerprint"),
        "chain": {"directory": str(directory), "batches": list(batches)},
    })
