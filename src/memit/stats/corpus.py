"""Text corpora for key statistics: local files, Hugging Face datasets, or model samples."""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Hub datasets for the names the paper's presets use.
HUB_CORPORA = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}


@dataclass(frozen=True)
class Corpus:
    """A named stream of texts; ``identity`` keys the statistics cache."""

    identity: str
    texts: Callable[[], Iterator[str]]


def resolve_corpus(
    source: str | Path | None, model: PreTrainedModel | None = None, tok: PreTrainedTokenizerBase | None = None
) -> Corpus:
    """A local ``.txt``/``.jsonl`` file (optionally ``.gz``), a hub dataset name, or, when the
    name cannot be loaded (no network), text sampled from ``model`` with a warning."""
    if source is not None and (Path(source).suffix in (".txt", ".jsonl", ".gz") or Path(source).exists()):
        return file_corpus(Path(source))
    if source is not None:
        try:
            return hub_corpus(str(source))
        except Exception as err:  # any load failure offline: fall back rather than stop the edit
            log.warning("Could not load corpus %r (%s)", source, err)
    if model is None or tok is None:
        raise ValueError("mom2_dataset: no corpus could be loaded and no model was given to sample text from")
    log.warning(
        "No text corpus available: computing key statistics on text sampled from the model itself. "
        "Pass a corpus file (for example a Wikipedia .jsonl.gz) for statistics like the paper's."
    )
    return model_sample_corpus(model, tok)


def file_corpus(path: Path) -> Corpus:
    if not path.is_file():
        raise FileNotFoundError(f"corpus: file {path} does not exist")
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:12]
    identity = f"{path.name}-{path.stat().st_size}-{head}"
    return Corpus(identity, lambda: _read_texts(path))


def _read_texts(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = ".jsonl" in path.suffixes
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if not is_jsonl:
                yield line.rstrip("\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"corpus {path}: line {line_number} is not JSON ({err})") from None
            if "text" not in record:
                raise ValueError(f"corpus {path}: line {line_number} has no 'text' field")
            yield record["text"]


def hub_corpus(name: str) -> Corpus:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("loading a hub corpus needs the 'datasets' package (pip install memit[hub])") from err
    repo, config = HUB_CORPORA.get(name, (name, None))
    dataset = datasets.load_dataset(repo, config, split="train", streaming=True)
    first = next(iter(dataset))  # fail now, not midway through the statistics
    if "text" not in first:
        raise ValueError(f"corpus {name}: records have no 'text' field")
    return Corpus(f"hub-{repo.replace('/', '_')}-{config}", lambda: (r["text"] for r in dataset if r["text"].strip()))


def model_sample_corpus(model: PreTrainedModel, tok: PreTrainedTokenizerBase, length: int = 128, batch: int = 32) -> Corpus:
    def texts() -> Iterator[str]:
        generator_seed = itertools.count()
        start = tok.bos_token or tok.eos_token
        while True:
            torch.manual_seed(next(generator_seed))
            prompt = tok([start] * batch, return_tensors="pt", add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **prompt, do_sample=True, top_k=50, max_new_tokens=length, pad_token_id=tok.pad_token_id
                )
            yield from tok.batch_decode(out[:, 1:], skip_special_tokens=True)

    return Corpus("model-samples", texts)
