"""Text corpora for key statistics: the Wikipedia sample packaged with memit, local files,
Hugging Face datasets, or text sampled from the model.

A corpus is resolved once into a `Corpus` whose ``identity`` keys every cache built
from it (statistics, null-space projectors, the local TF-IDF fit). A corpus the user names
must load, or resolving it raises `CorpusError` saying why; only the preset's default
falls back, with a warning, to the packaged sample.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.errors import InputError, MissingFileError
from memit.utils.progress import progress

log = logging.getLogger(__name__)

# Corpora inside the package: the first 2,000 articles of a 2015 English Wikipedia sample,
# cut to the 4,096 characters that 256-token statistics samples read (scripts/make_corpus_sample.py).
PACKAGED_CORPORA = {"wikipedia-sample": "wikipedia_en_2015_sample2000.jsonl.gz"}
FALLBACK_CORPUS = "wikipedia-sample"
MODEL_SAMPLES = "model-samples"
# Hub datasets for the names the paper's presets use.
HUB_CORPORA = {
    "wikipedia": ("wikimedia/wikipedia", "20231101.en"),
    "wikitext": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
}
FILE_SUFFIXES = (".txt", ".jsonl", ".gz")


class CorpusError(InputError):
    """A corpus cannot be loaded; the message says which and why."""


@dataclass(frozen=True)
class Corpus:
    """A named stream of texts; ``identity`` keys the caches built from it."""

    identity: str
    texts: Callable[[], Iterator[str]]


def resolve_corpus(
    named: str | Path | None,
    default: str = FALLBACK_CORPUS,
    model: PreTrainedModel | None = None,
    tok: PreTrainedTokenizerBase | None = None,
) -> Corpus:
    """The corpus the user ``named`` (which must load), else the preset's ``default``, else,
    with a warning, the packaged Wikipedia sample."""
    if named is not None:
        return load_corpus(named, model, tok)
    try:
        return load_corpus(default, model, tok)
    except CorpusError as err:
        log.warning("%s; using the Wikipedia sample packaged with memit instead (2,000 articles)", err)
        return load_corpus(FALLBACK_CORPUS)


def load_corpus(source: str | Path, model: PreTrainedModel | None = None, tok: PreTrainedTokenizerBase | None = None) -> Corpus:
    """A packaged corpus name, ``model-samples``, a local ``.txt``/``.jsonl`` file (optionally
    ``.gz``), or a hub dataset name."""
    name = str(source)
    if name in PACKAGED_CORPORA:
        return file_corpus(Path(str(resources.files("memit") / "data" / PACKAGED_CORPORA[name])))
    if name == MODEL_SAMPLES:
        if model is None or tok is None:
            raise CorpusError(f"corpus {MODEL_SAMPLES!r}: needs the model to sample text from")
        log.warning("Computing key statistics on text sampled from the model itself, not the paper's statistic")
        return model_sample_corpus(model, tok)
    if Path(name).suffix in FILE_SUFFIXES or Path(name).exists():
        return file_corpus(Path(name))
    return hub_corpus(name)


def file_corpus(path: Path) -> Corpus:
    if not path.is_file():
        raise MissingFileError(f"corpus: file {path} does not exist")
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:12]
    identity = f"{path.name}-{path.stat().st_size}-{head}"
    return Corpus(identity, lambda: read_texts(path))


def read_texts(path: Path) -> Iterator[str]:
    """Texts of a .txt (one per line) or .jsonl file with a ``text`` field, optionally gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    is_jsonl = ".jsonl" in path.suffixes
    line_number = 0
    try:
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
                    raise CorpusError(f"corpus {path}: line {line_number} is not JSON ({err})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CorpusError(f"corpus {path}: line {line_number} has no 'text' field (a string)")
                yield record["text"]
    except UnicodeDecodeError as err:
        raise CorpusError(f"corpus {path}: line {line_number + 1} is not UTF-8 text ({err.reason})") from None
    except (gzip.BadGzipFile, EOFError) as err:
        raise CorpusError(f"corpus {path}: not a readable gzip file ({err})") from None


def hub_corpus(name: str) -> Corpus:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"corpus {name!r}: not a file or a packaged corpus ({', '.join(PACKAGED_CORPORA)}), and loading it "
            "from the Hugging Face hub needs the 'datasets' package (pip install memit[hub])"
        ) from None
    repo, config = HUB_CORPORA.get(name, (name, None))
    try:
        dataset = datasets.load_dataset(repo, config, split="train", streaming=True)
        first = next(iter(dataset))  # fail now, not midway through the statistics
    except Exception as err:  # offline, unknown name, gated: all mean the same to the user
        raise CorpusError(f"corpus {name!r}: could not load {repo} from the hub ({type(err).__name__}: {err})") from None
    if "text" not in first:
        raise CorpusError(f"corpus {name!r}: records of {repo} have no 'text' field")
    return Corpus(f"hub-{repo.replace('/', '_')}-{config}", lambda: (r["text"] for r in dataset if r["text"].strip()))


def model_sample_corpus(model: PreTrainedModel, tok: PreTrainedTokenizerBase, length: int = 128, batch: int = 32) -> Corpus:
    def texts() -> Iterator[str]:
        generator_seed = itertools.count()
        bar = progress(desc="sampling texts from the model", unit="texts", logger=log, leave=False)
        start = tok.bos_token or tok.eos_token
        while True:
            torch.manual_seed(next(generator_seed))
            prompt = tok([start] * batch, return_tensors="pt", add_special_tokens=False).to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **prompt, do_sample=True, top_k=50, max_new_tokens=length, pad_token_id=tok.pad_token_id
                )
            bar.update(len(out))
            yield from tok.batch_decode(out[:, 1:], skip_special_tokens=True)

    return Corpus(MODEL_SAMPLES, texts)
