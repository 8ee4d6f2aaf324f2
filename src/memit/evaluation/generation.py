"""Generation metrics of CounterFact: fluency (n-gram entropy) and consistency (TF-IDF
similarity to attribute snippets), as the paper's code computes them.

- Texts are the prompt followed by its greedy continuation of ``max_new_tokens`` tokens
  (the paper's ``generate_fast`` returns the whole decoded sequence, prompt included).
- Fluency of one text: mean of (2/3 x bigram entropy, 4/3 x trigram entropy) in bits,
  averaged over a case's texts. Words come from a regex close to ``nltk.word_tokenize``
  (nltk is not a dependency).
- Consistency: cosine between the TF-IDF vectors of all generated texts joined by spaces
  and of all snippets about (relation, target_new) joined by spaces. With the paper's
  ``idf.npy`` and ``tfidf_vocab.json`` in the data folder the vectorizer is the paper's;
  otherwise it is fitted on the local corpus and labelled ``local:<corpus>``, not the paper's.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import cosine_similarity
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from memit.errors import InputError
from memit.stats.corpus import Corpus
from memit.utils.compat import contiguous_head_input
from memit.utils.io import read_json

log = logging.getLogger(__name__)

SNIPPETS_FILE = "attribute_snippets.json"
IDF_FILE = "idf.npy"
VOCAB_FILE = "tfidf_vocab.json"
WEIGHTS = {2: 2 / 3, 3: 4 / 3}
_WORD = re.compile(r"\w+(?:'\w+)?|'\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    return _WORD.findall(text)


def ngram_entropy(text: str, n: int) -> float:
    """Entropy in bits of the n-gram frequency distribution of ``text`` (0 if it has none)."""
    words = word_tokenize(text)
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_fluency(text: str) -> float:
    """The paper's ``compute_n_gram_entropy``: mean of the weighted bi- and trigram entropies."""
    return float(np.mean([w * ngram_entropy(text, n) for n, w in WEIGHTS.items()]))


def fluency(texts: list[str]) -> float:
    """The paper's ``n_gram_entropy``: arithmetic mean over texts."""
    return float(np.mean([text_fluency(t) for t in texts]))


def greedy_continuations(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    stop: Callable[[int], StoppingCriteria] | None = None,
) -> list[str]:
    """The greedy continuation of each prompt, without the prompt (batched, left-padded);
    ``stop(prompt_width)`` gives a batch its per-row stopping criterion."""
    texts: list[str] = []
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tok(list(prompts[start : start + batch_size]), padding=True, return_tensors="pt").to(model.device)
            width = batch["input_ids"].shape[1]
            criteria = StoppingCriteriaList([stop(width)]) if stop is not None else None
            with torch.no_grad(), contiguous_head_input(model):  # generate keeps the last logits only
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                    top_p=None, top_k=None, temperature=None, stopping_criteria=criteria,
                )
            texts.extend(tok.batch_decode(out[:, width:], skip_special_tokens=True))
    finally:
        tok.padding_side = side
    return texts


def generate_greedy(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int = 100,
    batch_size: int = 16,
) -> list[str]:
    """Prompt plus greedy continuation for each prompt (batched, left-padded)."""
    return [p + c for p, c in zip(prompts, greedy_continuations(model, tok, prompts, max_new_tokens, batch_size))]


# --- consistency ------------------------------------------------------------------------


@dataclass
class TfidfModel:
    """A fitted vectorizer and where it came from (``paper`` or ``local:<corpus>``)."""

    vectorizer: TfidfVectorizer
    source: str

    @property
    def is_papers(self) -> bool:
        return self.source == "paper"

    def similarity(self, text_a: str, text_b: str) -> float:
        """The paper's ``tfidf_similarity``: cosine of the two TF-IDF vectors."""
        encs = self.vectorizer.transform([text_a, text_b])
        return float(cosine_similarity(encs[0], encs[1])[0, 0])


def paper_tfidf(folder: str | os.PathLike) -> TfidfModel | None:
    """The paper's vectorizer from ``idf.npy`` and ``tfidf_vocab.json``, or None if absent."""
    folder = Path(folder)
    if not ((folder / IDF_FILE).is_file() and (folder / VOCAB_FILE).is_file()):
        return None
    idf = np.load(folder / IDF_FILE)
    vocab = read_json(folder / VOCAB_FILE, what="tf-idf vocabulary")
    vec = TfidfVectorizer()
    vec.vocabulary_ = vocab
    vec.idf_ = idf
    return TfidfModel(vec, "paper")


def local_tfidf(corpus: Corpus, n_docs: int = 2000) -> TfidfModel:
    """A vectorizer fitted on the first ``n_docs`` documents of ``corpus`` (not the paper's)."""
    log.info("Fitting TF-IDF on %d documents of %s (not the paper's idf)", n_docs, corpus.identity)
    vec = TfidfVectorizer()
    vec.fit(islice(corpus.texts(), n_docs))
    return TfidfModel(vec, f"local:{corpus.identity}")


def load_tfidf(folder: str | os.PathLike, corpus: Callable[[], Corpus]) -> TfidfModel:
    """The paper's vectorizer if its files are in ``folder``, else one fitted on ``corpus()``."""
    return paper_tfidf(folder) or local_tfidf(corpus())


Snippets = dict[str, dict[str, list[dict]]]


def load_snippets(folder: str | os.PathLike) -> Snippets | None:
    """``attribute_snippets.json`` as relation_id -> target_id -> [{name, text}], or None."""
    path = Path(folder) / SNIPPETS_FILE
    if not path.is_file():
        return None
    snips: Snippets = defaultdict(lambda: defaultdict(list))
    for i, entry in enumerate(read_json(path, what="attribute snippets")):
        try:
            snips[entry["relation_id"]][entry["target_id"]].extend(entry["samples"])
        except (KeyError, TypeError) as err:
            raise InputError(f"{path}: record {i}: missing field {err}") from None
    return snips


def consistency(texts: Iterable[str], snippet_texts: list[str], tfidf: TfidfModel) -> float:
    """The paper's reference score: generated texts vs. the snippets, all joined by spaces."""
    return tfidf.similarity(" ".join(texts), " ".join(snippet_texts))


__all__ = [
    "TfidfModel",
    "consistency",
    "fluency",
    "generate_greedy",
    "greedy_continuations",
    "load_snippets",
    "load_tfidf",
    "local_tfidf",
    "ngram_entropy",
    "paper_tfidf",
    "text_fluency",
    "word_tokenize",
]
