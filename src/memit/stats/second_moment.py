"""The uncentered second moment E[k kᵀ] of MLP keys over corpus tokens, cached on disk."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.errors import InputError
from memit.models.layout import ModelLayout
from memit.models.loading import model_fingerprint
from memit.stats.corpus import Corpus
from memit.utils import distributed
from memit.utils.grad import bf16_autocast
from memit.utils.hooks import run_and_capture
from memit.utils.io import atomic_path, memit_home
from memit.utils.paths import path_component
from memit.utils.progress import progress

log = logging.getLogger(__name__)

# Dtypes the statistics may be stored in (hyperparameter mom2_dtype).
STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Tokens per statistics batch (samples x longest sample, padding included), whatever the
# context length; EditOptions.stats_batch_tokens / --stats-batch-tokens set it. The paper's
# code sized a batch as 3 x max_position_embeddings tokens instead (on Llama-3.2-1B, with
# 131,072 positions, a 506 GiB request). The default fits a 24 GB GPU holding an 8B model in
# bfloat16 (Llama-3-8B: hidden 4096, MLP 14336, 32 layers, ~16 GB of weights), which leaves
# ~6 GB (less ~0.5 GB of CUDA context). Per token of a batch, with SDPA attention, no
# key/value cache, and five edit layers (the pass stops after the last one):
#   captured keys, held until counted: 5 layers x 14336 x 2 B          = 143 KB
#   one layer's transients (MLP gate/up/product 2 x 14336 x 2 B beyond
#     the key, residual stream and float32 RMSNorm temporaries ~48 KB)  = 105 KB
#   counting one layer: float32 copy of its keys 14336 x 4 B (+ the
#     bfloat16 gather of a padded batch, 14336 x 2 B)                  =  86 KB
# so at most ~250 KB a token (143 + 105 while the forward runs; 143 + 86 while counting),
# about 2.0 GB for 8,192 tokens. Fixed: one float32 Gram update, 14336^2 x 4 B = 0.82 GB,
# plus a 0.2 GB strip of it. 8,192 tokens: ~3.0 GB of the ~5.5 GB, a margin of ~2.5 GB
# (16,384 would need ~5.1 GB). The float64 running sums (5 x 14336^2 x 8 B = 8.2 GB) do not
# fit beside it: they stay on the model's device only where they take at most half its free
# memory, else on the CPU (_accumulator_device). Eager attention adds heads x sample length
# x ~8 B a token (32 x 2048 x 8 B = 0.5 MB for 2,048-token samples): lower the budget there.
DEFAULT_BATCH_TOKENS = 8192

# Given the float64 running sums per layer and the token count so far.
Snapshot = Callable[[dict[int, torch.Tensor], int], None]
# A pass saves its running sums this many times, so that a killed pass resumes from the last,
# but with at least MIN_CHECKPOINT_SAMPLES samples between saves: a save writes every layer's
# d x d float64 sums (3.2 GB for six layers of width 8,192), and a pass of a few samples
# saving after each one spent half its time writing.
CHECKPOINTS_PER_PASS = 10
MIN_CHECKPOINT_SAMPLES = 100


@dataclass
class PartialSums:
    """The running sums (float64, not yet divided) and token count of the first ``samples``
    corpus samples: where a pass that was cut short resumes."""

    sums: dict[int, torch.Tensor]
    count: int
    samples: int


def check_batch_tokens(max_tokens: int, batch_tokens: int) -> None:
    """A statistics batch holds whole samples: one sample may not exceed the token budget."""
    if batch_tokens < 1:
        raise InputError(f"stats_batch_tokens: must be positive, got {batch_tokens}")
    if max_tokens > batch_tokens:
        raise InputError(
            f"stats_batch_tokens: a corpus sample may have {max_tokens} tokens (mom2_max_tokens, or the model's "
            f"context length when unset), more than the budget of {batch_tokens} tokens per statistics batch; "
            f"raise --stats-batch-tokens to at least {max_tokens} or set mom2_max_tokens to at most {batch_tokens} "
            "(which changes the statistics)"
        )


def _accumulator_device(device: torch.device, n_layers: int, dim: int) -> torch.device:
    """Where the float64 running sums live: the model's CUDA device when all of them take at
    most half of its free memory, else the CPU (MPS has no float64). The numbers are the same
    either way; on the CPU each batch's float32 Gram is copied over."""
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        need = n_layers * dim * dim * 8
        free, _ = torch.cuda.mem_get_info(device)
        if need <= free // 2:
            return device
        log.info("Key statistics: the float64 sums (%.1f GB) accumulate on the CPU (%.1f GB free on %s)", need / 1e9, free / 1e9, device)
    return torch.device("cpu")


def collect_second_moments(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layout: ModelLayout,
    layers: list[int],
    texts: Iterable[str],
    n_samples: int,
    max_tokens: int,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    autocast: bool = False,
    snapshots: Mapping[int, Snapshot] | None = None,
    start: PartialSums | None = None,
) -> tuple[dict[int, torch.Tensor], int]:
    """Second moments of the MLP-output-projection inputs at ``layers`` (float64), from one
    forward pass per batch that stops after the last layer needed; and the token count.

    A batch holds at most ``batch_tokens`` tokens, padding included; the budget changes only
    how samples are grouped, never the statistics. A sample may not be longer than the budget
    (``max_tokens > batch_tokens`` is rejected before any work).

    ``snapshots``: sample count -> a function given the running sums and token count once the
    first that many samples are counted (a batch never straddles a snapshot), so that one
    pass yields the statistics of several corpus sizes.

    In a torch.distributed group each process counts every ``world_size``-th sample and the
    sums are added up across processes (at each snapshot too); every process gets the result.

    ``start``: continue a pass from its partial sums (the first ``start.samples`` samples are
    skipped; in a torch.distributed group the main process holds the partial sums)."""
    check_batch_tokens(max_tokens, batch_tokens)
    names = {layer: layout.mlp_out_name(layer) for layer in layers}
    sums: dict[int, torch.Tensor] = {}
    done = start.samples if start is not None else 0
    resumed = dict(start.sums) if start is not None and distributed.is_main() else {}
    count = start.count if start is not None and distributed.is_main() else 0
    snapshots = {n: f for n, f in (snapshots or {}).items() if done < n < n_samples}
    bar = progress(total=-(-(n_samples - done) // distributed.world_size()), desc="key statistics", unit="samples", logger=log)
    for batch in _segmented_batches(tok, iter(texts), [*sorted(snapshots), n_samples], max_tokens, batch_tokens, done):
        if isinstance(batch, int):
            total = _summed_count(count)
            if total == 0:
                raise InputError("mom2_dataset: the corpus yielded no tokens")
            current = {**resumed, **sums}
            reduced = {layer: distributed.all_reduce_sum(s.clone()) for layer, s in current.items()} if distributed.is_distributed() else current
            snapshots[batch](reduced, total)
            del reduced
            continue
        batch = {k: v.to(model.device) for k, v in batch.items()}
        mask = batch["attention_mask"].bool()
        with torch.no_grad(), bf16_autocast(autocast, model.device):
            # No key/value cache: nothing reads it, and it would hold every layer's keys and values.
            inputs, _ = run_and_capture(model, {**batch, "use_cache": False}, inputs_of=list(names.values()), stop_after=names[max(layers)])
        all_tokens = bool(mask.all())
        for layer, name in names.items():
            hidden = inputs.pop(name)  # each layer's captured keys are freed once counted
            # Unpadded batches (most corpus samples fill max_tokens) need no gather copy.
            keys = (hidden.flatten(0, 1) if all_tokens else hidden[mask.to(hidden.device)]).float()
            del hidden
            gram = _gram(keys)
            del keys
            if layer not in sums:
                device = _accumulator_device(gram.device, len(names), gram.shape[0])
                sums[layer] = torch.zeros(gram.shape, dtype=torch.float64, device=device)
                if layer in resumed:
                    sums[layer].add_(resumed.pop(layer).to(device))
            # In-place float32 -> float64 add: the same numbers as gram.double(), without the copy.
            sums[layer].add_(gram.to(sums[layer].device))
            del gram
        count += int(mask.sum())
        bar.update(len(mask))
    bar.close()
    sums.update(resumed)  # layers no batch reached after the resumption
    count = _summed_count(count)
    if count == 0:
        raise InputError("mom2_dataset: the corpus yielded no tokens")
    # In place: a second set of float64 matrices would double the sums' memory at the end.
    return {layer: distributed.all_reduce_sum(total).div_(count) for layer, total in sums.items()}, count


def _summed_count(count: int) -> int:
    return int(distributed.all_reduce_sum(torch.tensor([count], dtype=torch.float64)).item())


def _gram(keys: torch.Tensor, strips: int = 4) -> torch.Tensor:
    """``keys.T @ keys``, computing each strip of rows only from the diagonal rightwards and
    mirroring the rest: the product is symmetric, so 4 strips do 10/16 of the multiply-adds
    (measured: 0.60 s against 0.77 s for 8192 x 1536 keys, bit-identical)."""
    dim = keys.shape[1]
    if dim < 256 * strips:
        return keys.T @ keys
    edges = [dim * i // strips for i in range(strips + 1)]
    out = keys.new_empty(dim, dim)
    for lo, hi in zip(edges[:-1], edges[1:]):
        strip = keys[:, lo:hi].T @ keys[:, lo:]
        out[lo:hi, lo:] = strip
        out[hi:, lo:hi] = strip[:, hi - lo :].T
    return out


def _tokenize_prefix(tok: PreTrainedTokenizerBase, text: str, max_tokens: int) -> list[int]:
    """The first ``max_tokens`` tokens of ``text``. Corpus articles run to tens of thousands of
    characters and tokenising all of it only to truncate was a sixth of a statistics pass, so
    tokenise a generous character prefix first; the result is the same whenever that prefix
    yields clearly more tokens than needed (the cut can only change tokens near its end)."""
    chars = max_tokens * 16
    if len(text) > chars:
        ids = tok(text[:chars])["input_ids"]
        if len(ids) > max_tokens + 16:
            return ids[:max_tokens]
    return tok(text, truncation=True, max_length=max_tokens)["input_ids"]


def _segmented_batches(
    tok: PreTrainedTokenizerBase, texts: Iterator[str], ends: list[int], max_tokens: int, batch_tokens: int, start: int = 0
) -> Iterator[dict[str, torch.Tensor] | int]:
    """The batches of this process's share of the texts from ``start`` to ``ends[-1]``, yielding
    each earlier end (a sample count) once the batches before it are out; no batch straddles an end."""
    rank, world = distributed.rank(), distributed.world_size()
    for _ in islice(texts, start):
        pass
    for end in ends:
        own = (text for i, text in enumerate(islice(texts, end - start), start) if i % world == rank)
        yield from _token_batches(tok, own, max_tokens, batch_tokens)
        if end != ends[-1]:
            yield end
        start = end


def _token_batches(
    tok: PreTrainedTokenizerBase, texts: Iterable[str], max_tokens: int, batch_tokens: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of samples truncated to ``max_tokens``, about ``batch_tokens`` each."""
    pending: list[list[int]] = []
    for text in texts:
        ids = _tokenize_prefix(tok, text, max_tokens)
        if not ids:
            continue
        if pending and (len(pending) + 1) * max(max(map(len, pending)), len(ids)) > batch_tokens:
            yield _right_padded(tok, pending)
            pending = []
        pending.append(ids)
    if pending:
        yield _right_padded(tok, pending)


def _right_padded(tok: PreTrainedTokenizerBase, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    # Right padding keeps every real token at its unpadded position.
    return dict(tok.pad({"input_ids": sequences}, padding=True, padding_side="right", return_tensors="pt"))


class SecondMomentCache:
    """Statistics on disk under ``root/<model fingerprint>/<corpus>/``, one file per layer,
    keyed by module name, sample count, token limit and dtype; missing layers are
    computed together in one pass."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else memit_home() / "stats"

    def get(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        layout: ModelLayout,
        layers: list[int],
        corpus: Corpus,
        n_samples: int,
        max_tokens: int | None = None,
        dtype: str = "float32",
        autocast: bool = False,
        batch_tokens: int | None = None,
    ) -> dict[int, torch.Tensor]:
        """``batch_tokens``: tokens per forward pass (default `DEFAULT_BATCH_TOKENS`); it
        changes only the memory used, not the statistics, and is not part of the cache key."""
        self.ensure(model, tok, layout, layers, corpus, [n_samples], max_tokens, dtype, autocast, batch_tokens)
        paths = self._paths(model, tok, layout, layers, corpus, n_samples, max_tokens, dtype, autocast)
        return {layer: load_file(str(path))["mom2"] for layer, path in paths.items()}

    def ensure(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        layout: ModelLayout,
        layers: list[int],
        corpus: Corpus,
        sizes: list[int],
        max_tokens: int | None = None,
        dtype: str = "float32",
        autocast: bool = False,
        batch_tokens: int | None = None,
        checkpoint_samples: int | None = None,
    ) -> None:
        """Compute and save whatever is missing of the statistics over the first ``n`` samples
        for every ``n`` in ``sizes``, in one pass over the largest (in a torch.distributed
        group, split across the processes; rank 0 writes the files). The pass saves its running
        sums every ``checkpoint_samples`` samples (default: a tenth of the pass, at least
        `MIN_CHECKPOINT_SAMPLES`), and a pass that was killed continues from the last save."""
        distributed.barrier()  # every process sees the same files missing
        paths = {n: self._paths(model, tok, layout, layers, corpus, n, max_tokens, dtype, autocast) for n in sizes}
        missing = sorted({layer for n in sizes for layer, path in paths[n].items() if not path.is_file()})
        if not missing:
            return
        largest = max(n for n in sizes if any(not p.is_file() for p in paths[n].values()))
        partial_path = self._partial_path(model, corpus, missing, largest, max_tokens or _context_length(model, tok), dtype, autocast)
        start = _load_partial(partial_path, missing)
        if start is not None and any(not paths[n][layer].is_file() for n in sizes if n <= start.samples for layer in missing):
            start = None  # the partial pass was made for other sizes: one of these would be skipped
        if start is not None:
            log.info("Key statistics: continuing from the %d samples counted before (%s)", start.samples, partial_path)

        def save(n: int, sums: dict[int, torch.Tensor], count: int, divide: bool = True) -> None:
            if not distributed.is_main():
                return
            for layer in missing:
                if not paths[n][layer].is_file():
                    moment = sums[layer] / count if divide else sums[layer]
                    with atomic_path(paths[n][layer]) as tmp:
                        save_file({"mom2": moment.to(STATS_DTYPES[dtype]).contiguous()}, str(tmp), metadata={"tokens": str(count)})

        def checkpoint(n: int, sums: dict[int, torch.Tensor], count: int) -> None:
            if n in sizes:
                save(n, sums, count)
            if distributed.is_main() and n in checkpoints:
                with atomic_path(partial_path) as tmp:
                    save_file({f"layer{layer}": sums[layer].cpu().contiguous() for layer in missing}, str(tmp),
                              metadata={"tokens": str(count), "samples": str(n)})

        step = checkpoint_samples or max(MIN_CHECKPOINT_SAMPLES, largest // CHECKPOINTS_PER_PASS)
        checkpoints = set(range(step, largest, step))
        log.info("Computing key statistics for layers %s over %s (%s samples)", missing, corpus.identity, sorted(sizes))
        snapshots = {n: functools.partial(checkpoint, n) for n in {*sizes, *checkpoints} if n < largest}
        moments, count = collect_second_moments(
            model, tok, layout, missing, corpus.texts(), largest, max_tokens or _context_length(model, tok),
            batch_tokens or DEFAULT_BATCH_TOKENS, autocast=autocast, snapshots=snapshots, start=start,
        )
        save(largest, moments, count, divide=False)
        if distributed.is_main():
            partial_path.unlink(missing_ok=True)
        distributed.barrier()  # the files rank 0 writes are read by every process

    def _partial_path(
        self, model: PreTrainedModel, corpus: Corpus, layers: list[int], n_samples: int, max_tokens: int, dtype: str, autocast: bool
    ) -> Path:
        """The running sums of an unfinished pass over these layers towards ``n_samples``."""
        layer_part = "-".join(map(str, layers))
        return self._folder(model, corpus) / f"partial_layers{layer_part}_n{n_samples}_t{max_tokens}_{dtype}{_autocast_suffix(autocast)}.safetensors"

    def _folder(self, model: PreTrainedModel, corpus: Corpus) -> Path:
        return self.root / model_fingerprint(model) / path_component(corpus.identity)

    def _paths(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, layout: ModelLayout, layers: list[int], corpus: Corpus,
        n_samples: int, max_tokens: int | None, dtype: str, autocast: bool,
    ) -> dict[int, Path]:
        max_tokens = max_tokens or _context_length(model, tok)
        folder = self._folder(model, corpus)
        suffix = f"_n{n_samples}_t{max_tokens}_{dtype}{_autocast_suffix(autocast)}.safetensors"
        return {layer: folder / f"{layout.mlp_out_name(layer)}{suffix}" for layer in layers}


def _autocast_suffix(autocast: bool) -> str:
    return "_bf16ac" if autocast else ""


def _load_partial(path: Path, layers: list[int]) -> PartialSums | None:
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        sums = {layer: f.get_tensor(f"layer{layer}") for layer in layers}
    return PartialSums(sums, int(meta["tokens"]), int(meta["samples"]))


def _context_length(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            return min(value, 2048)
    return min(tok.model_max_length, 2048)
