"""Lifelong editing: a chain of edit batches on one model, each made on top of the ones
before it, that can be saved, loaded in another process and continued, and reverted.

The chain keeps, besides the model, one copy of the weights its batches changed as they were
before the first batch (for exact reverts and for target vectors from the unedited model)
and one running Gram matrix of the edited keys per layer (for solves that preserve earlier
edits). Neither grows with the number of batches; each batch's deltas and keys live in its
folder on disk (or in memory for a chain without a folder).

Saved as a folder: ``chain.json`` (method, hyperparameters, the unedited weights'
fingerprint, the batches in order) and one `WeightDeltas` folder per batch.
``chain.json`` is written after its batch's folder is complete, so an interrupted save leaves
the chain as it was.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import CONFIG_FILE, WeightDeltas, summed_deltas
from memit.editing.base import EditOptions, Editor
from memit.editing.hparams import HyperParams
from memit.editing.methods import get_editor_class, resolve_hparams
from memit.editing.preserved import edit_gram, gram_name
from memit.editing.target_cache import weights_fingerprint
from memit.errors import InputError, MissingFileError
from memit.models.loading import model_fingerprint
from memit.requests import EditRequest
from memit.utils.io import read_json, write_json

log = logging.getLogger(__name__)

CHAIN_FILE = "chain.json"


class EditChain:
    """Batches of edits applied to ``model`` one after another. Start one with
    `start` or continue a saved one with `load`; then `edit` appends a
    batch and `revert` takes the last ones back, bit for bit."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        editor: Editor,
        directory: str | Path | None = None,
        unedited_fingerprint: str | None = None,
    ):
        self.model, self.tok, self.editor = model, tok, editor
        self.directory = Path(directory) if directory is not None else None
        self.unedited_fingerprint = unedited_fingerprint or weights_fingerprint(model)
        self._base: dict[str, torch.Tensor] = {}
        self._gram: dict[int, torch.Tensor] = {}
        # Every batch's requests (their dictionary form), oldest first.
        self._requests: list[dict[str, Any]] = []
        # Batch folder names in a saved chain; the deltas themselves in an unsaved one.
        self._batches: list[str | WeightDeltas] = []

    @classmethod
    def start(
        cls,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        algorithm: str = "MEMIT",
        hparams: HyperParams | str | Path | Mapping | None = None,
        directory: str | Path | None = None,
        options: EditOptions | None = None,
    ) -> "EditChain":
        """A new, empty chain on ``model`` as it is now; saved in ``directory`` if given (which
        must not hold a chain already)."""
        if directory is not None and (Path(directory) / CHAIN_FILE).is_file():
            raise InputError(f"chain: {directory} already holds a chain; load it with EditChain.load to continue it")
        editor = get_editor_class(algorithm)(resolve_hparams(algorithm, hparams, model), options)
        chain = cls(model, tok, editor, directory)
        chain._save_manifest()
        return chain

    @classmethod
    def load(
        cls, directory: str | Path, model: PreTrainedModel, tok: PreTrainedTokenizerBase, options: EditOptions | None = None
    ) -> "EditChain":
        """The chain saved in ``directory``, with every batch applied to ``model``, which must be
        the model the chain started from (unedited)."""
        directory = Path(directory)
        if not (directory / CHAIN_FILE).is_file():
            raise MissingFileError(f"chain: {directory / CHAIN_FILE} does not exist")
        manifest = read_json(directory / CHAIN_FILE, what="chain manifest")
        algorithm = manifest.get("algorithm")
        editor_cls = get_editor_class(str(algorithm))
        hparams = editor_cls.hparams_class.from_dict(manifest.get("hparams", {}), source=str(directory / CHAIN_FILE))
        fingerprint = weights_fingerprint(model)
        if fingerprint != manifest.get("unedited_weights"):
            raise InputError(
                f"chain: {directory} was started on a model with weights {manifest.get('unedited_weights')}, "
                f"this one has {fingerprint}; load the chain onto the unedited model it started from"
            )
        chain = cls(model, tok, editor_cls(hparams, options), directory, fingerprint)
        try:
            for name in manifest.get("batches", []):
                chain._take(WeightDeltas.load(directory / name).apply(model))
                chain._batches.append(name)
        except BaseException:
            chain._restore_base()  # a damaged batch leaves none of the chain applied
            raise
        log.info("Loaded an edit chain of %d batches from %s", len(chain), directory)
        return chain

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def algorithm(self) -> str:
        """The editing method every batch of the chain is made with (``"MEMIT"``, ...)."""
        return self.editor.name

    def batch(self, index: int) -> WeightDeltas:
        """Batch ``index`` (oldest first) as saved, not applied."""
        return self._deltas(self._batches[index])

    def edit(self, requests: Iterable[Mapping[str, Any] | EditRequest]) -> WeightDeltas:
        """Edit ``requests`` into the model on top of every batch so far, and append them as a
        batch (saved at once in a saved chain). Returns the new batch's deltas."""
        earlier = [self._as_earlier()] if self._batches else []
        deltas = self.editor.edit(self.model, self.tok, requests, earlier, unedited=self._base)
        self._take(deltas)
        if self.directory is None:
            self._batches.append(deltas)
            return deltas
        name = f"batch_{len(self):05d}"
        try:
            deltas.save(self.directory / name)
            self._batches.append(name)
            self._save_manifest()
        except BaseException:
            # The model and the chain as the saved chain has them.
            if self._batches[-1:] == [name]:
                self._batches.pop()
            shutil.rmtree(self.directory / name, ignore_errors=True)
            self.revert(0)
            raise
        return deltas

    def revert(self, batches: int | None = None) -> None:
        """Take the last ``batches`` batches back (all of them when None): the model gets
        exactly the weights it had before them, and a saved chain forgets them."""
        batches = len(self) if batches is None else batches
        if not 0 <= batches <= len(self):
            raise InputError(f"batches: the chain has {len(self)} batch(es), cannot revert {batches}")
        kept, dropped = self._batches[: len(self) - batches], self._batches[len(self) - batches :]
        self._restore_base()
        for entry in kept:
            self._take(self._deltas(entry).apply(self.model))
            self._batches.append(entry)
        if self.directory is not None and dropped:
            self._save_manifest()
            for name in dropped:
                shutil.rmtree(self.directory / name, ignore_errors=True)

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """The model as before the chain's first batch inside the block (e.g. to compare
        answers); every batch back, bit for bit, after it. The chain itself does not change."""
        from memit.editing.common import replaced_weights

        with replaced_weights(self.model, self._base):
            yield

    def _restore_base(self) -> None:
        """The model's weights as before the chain's first batch; no batch counted."""
        with torch.no_grad():
            for name, weight in self._base.items():
                self.model.get_parameter(name).copy_(weight)
        self._gram, self._batches, self._requests = {}, [], []

    def _deltas(self, entry: str | WeightDeltas) -> WeightDeltas:
        return WeightDeltas.load(self.directory / entry) if isinstance(entry, str) else entry

    def _take(self, deltas: WeightDeltas) -> None:
        """Account for a batch just applied: the unedited weights it changed, its keys."""
        for name, original in deltas.original_weights().items():
            self._base.setdefault(name, original)
        deltas.release()
        self._requests.extend(deltas.manifest.get("requests") or [])
        for layer in getattr(self.editor.hparams, "layers", []):
            gram = edit_gram(deltas, layer)
            if gram is not None:
                self._gram[layer] = gram if layer not in self._gram else self._gram[layer] + gram

    def _as_earlier(self) -> WeightDeltas:
        """The batches so far as the one earlier edit a new batch is made on top of: their
        requests and the running Gram of their keys."""
        state = {gram_name(layer): gram for layer, gram in self._gram.items()}
        return WeightDeltas({}, {"algorithm": f"{self.algorithm} chain", "requests": self._requests}, state)

    def _save_manifest(self) -> None:
        if self.directory is None:
            return
        write_json(self.directory / CHAIN_FILE, {
            "algorithm": self.algorithm,
            "hparams": self.editor.hparams.to_dict(),
            "model_fingerprint": model_fingerprint(self.model),
            "unedited_weights": self.unedited_fingerprint,
            "batches": [entry for entry in self._batches if isinstance(entry, str)],
        })


def load_edits(directory: str | Path) -> WeightDeltas:
    """The deltas saved in ``directory`` (checked against their checksum), or, for a chain
    folder, one `WeightDeltas` holding the sum of its batches and all their requests."""
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
    requests: list = []

    def loaded() -> Iterator[WeightDeltas]:
        for name in batches:
            batch = WeightDeltas.load(directory / name)
            requests.extend(batch.manifest.get("requests") or [])
            yield batch

    summed = summed_deltas(loaded())
    log.info("Chain %s: %d batches, %d requests, %d edited weights", directory, len(batches), len(requests), len(summed))
    return WeightDeltas(summed, {
        "algorithm": manifest.get("algorithm"),
        "hparams": manifest.get("hparams", {}),
        "requests": requests,
        "model_fingerprint": manifest.get("model_fingerprint"),
        "chain": {"directory": str(directory), "batches": list(batches)},
    })
