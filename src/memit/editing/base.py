"""The interface every editing method implements (the catalogue of methods is editing/methods.py)."""
from __future__ import annotations

import contextlib
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas
from memit.editing.hparams import HyperParams, HyperParamsError
from memit.editing.lapsed import lapsed_requests, standing_requests
from memit.errors import InputError
from memit.models.layout import ModelLayout
from memit.models.loading import model_fingerprint
from memit.requests import EditRequest, check_tokenization, parse_requests, warn_merged_subjects
from memit.stats.corpus import FALLBACK_CORPUS, Corpus, resolve_corpus
from memit.stats.second_moment import DEFAULT_BATCH_TOKENS


@dataclass
class EditOptions:
    """How to run an edit; none of these change what the edit should compute."""

    # A corpus (file, packaged or hub name) for key statistics, overriding the preset's
    # mom2_dataset; it must load, where the preset's may fall back to the packaged sample.
    corpus: str | None = field(default_factory=lambda: os.environ.get("MEMIT_CORPUS"))
    stats_dir: str | None = None
    # Tokens per forward pass of the key statistics (padding included): only the memory
    # changes, not the statistics. The default fits an 8B bfloat16 model on a 24 GB GPU
    # (the arithmetic is at memit.stats.second_moment.DEFAULT_BATCH_TOKENS).
    stats_batch_tokens: int = DEFAULT_BATCH_TOKENS
    # Requests whose target vectors are optimised together.
    batch_size: int = 16
    # False runs the reference computation: the whole model at every optimisation step.
    fast: bool = True
    # bfloat16 autocast for forward passes (statistics and solves stay in float32/float64).
    autocast: bool = False
    seed: int = 0
    # A folder of target vectors cached per request (memit.editing.target_cache); None: no cache.
    target_cache: str | None = None


@dataclass
class EditTask:
    """One edit's inputs: the model with its tokenizer and layout, the requests, and the edits
    already applied to the model (oldest first), for methods that protect them."""

    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    layout: ModelLayout
    requests: list[EditRequest]
    earlier: Sequence[WeightDeltas] = ()
    # How many of the last requests are earlier edits written again (``rewrite_lapsed``).
    rewritten: int = 0
    # The weights the earlier edits changed, as they were before them; None: read from
    # ``earlier`` (memit.editing.preserved.unedited_weights) when a method needs them.
    unedited: Mapping[str, torch.Tensor] | None = None
    # The keys (rows) at each edit layer of the edited model, for methods that keep them.
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    # Seconds spent in each named phase of the edit (for benchmarks and logs).
    timings: dict[str, float] = field(default_factory=dict)
    # How closely the solves met their targets (memit.editing.common.write_over_layers), for
    # methods that report it; saved in the edit's manifest.
    fit: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the seconds spent inside the ``with`` block to ``timings[phase]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - start


class Editor(ABC):
    """An editing method: computes weight deltas for a batch of requests."""

    name: ClassVar[str]
    hparams_class: ClassVar[type[HyperParams]]

    def __init__(self, hparams: HyperParams, options: EditOptions | None = None):
        if not isinstance(hparams, self.hparams_class):
            raise HyperParamsError(f"hparams: {self.name} needs {self.hparams_class.__name__}, got {type(hparams).__name__}")
        self.hparams = hparams
        self.options = options or EditOptions()
        self._corpus: Corpus | None = None

    @abstractmethod
    def compute_deltas(self, task: EditTask) -> dict[str, torch.Tensor]:
        """Parameter name -> additive change; ``task.model`` is left as it was."""

    def edit_state(self, task: EditTask) -> dict[str, torch.Tensor]:
        """Tensors that later edits need from this one, computed on the edited model (kept
        in `WeightDeltas.state`); none by default."""
        return {}

    def lapsed(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, earlier: Sequence[WeightDeltas], requests: list[EditRequest]
    ) -> list[EditRequest]:
        """The earlier edits to write again beside ``requests`` (hyperparameter ``rewrite_lapsed``)."""
        limit = getattr(self.hparams, "rewrite_lapsed", 0)
        if not limit or not earlier:
            return []
        return lapsed_requests(model, tok, standing_requests(earlier, requests), limit)

    def corpus(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> Corpus:
        """The key-statistics corpus, resolved once per editor: the options' corpus, else the
        preset's ``mom2_dataset`` (methods without one use the packaged sample)."""
        if self._corpus is None:
            default = getattr(self.hparams, "mom2_dataset", FALLBACK_CORPUS)
            self._corpus = resolve_corpus(self.options.corpus, default, model, tok)
        return self._corpus

    def layout(self, model: PreTrainedModel) -> ModelLayout:
        """Where ``model``'s layers and MLP output projections are (the hyperparameters' module
        names where they give them); raises ``InputError`` for edit layers the model lacks."""
        hp = self.hparams
        layout = ModelLayout.from_model(model, getattr(hp, "layer_module_tmp", None), getattr(hp, "rewrite_module_tmp", None))
        layout.check_layers(getattr(hp, "layers", []))
        for layer in getattr(hp, "layers", []):
            if layout.mlp_out(model, layer).weight.device.type == "meta":
                raise InputError(
                    f"layers: layer {layer} ({layout.weight_name(layer)}) is offloaded by the device map; "
                    "keep the edited layers on a device (cpu, cuda) and offload others"
                )
        return layout

    def edit(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        requests: Iterable[Mapping[str, Any] | EditRequest],
        earlier: Sequence[WeightDeltas] = (),
        unedited: Mapping[str, torch.Tensor] | None = None,
    ) -> WeightDeltas:
        """Validate ``requests``, compute the deltas, apply them to ``model`` and return them.

        ``earlier``: edits already applied to ``model`` (oldest first) that this one should
        preserve: AlphaEdit keeps its update away from their keys, MEMIT with a
        ``preserve_weight`` keeps their keys' outputs in its solve; other methods ignore them.
        ``unedited``: the weights from before the earlier edits, where ``earlier`` does not
        hold them (an `memit.chain.EditChain` passes its base weights).
        """
        requests = parse_requests(requests)
        warn_merged_subjects(requests, check_tokenization(requests, tok))
        layout = self.layout(model)
        torch.manual_seed(self.options.seed)
        rewritten = self.lapsed(model, tok, earlier, requests)
        task = EditTask(model, tok, layout, requests + rewritten, earlier, len(rewritten), unedited)
        with task.timed("edit"):
            deltas = self.compute_deltas(task)
        manifest = {
            "algorithm": self.name,
            "hparams": self.hparams.to_dict(),
            "requests": [r.to_dict() for r in requests],
            **({"rewritten": [r.to_dict() for r in rewritten]} if rewritten else {}),
            "model_fingerprint": model_fingerprint(model),
            "model_name": getattr(model.config, "_name_or_path", ""),
            **({"fit": task.fit} if task.fit else {}),
        }
        edit = WeightDeltas(deltas, manifest, timings=task.timings).apply(model)
        try:
            edit.state = self.edit_state(task)
        except BaseException:
            edit.revert(model)  # no half-finished edit left on the model
            raise
        return edit
