"""Corpus sources for key statistics."""
import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memit.stats import resolve_corpus
from tests.conftest import CORPUS


def test_local_jsonl_gz_corpus_yields_article_texts():
    corpus = resolve_corpus(str(CORPUS))
    first = next(corpus.texts())
    assert isinstance(first, str) and len(first) > 100
    assert corpus.identity.startswith("wikipedia_en_2015_sample.jsonl.gz-")


def test_unloadable_dataset_falls_back_to_model_samples_with_a_warning(default_model, caplog):
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=49152)
    tiny = AutoModelForCausalLM.from_config(config).eval()
    with caplog.at_level(logging.WARNING):
        corpus = resolve_corpus("no-such-dataset", tiny, default_model[1])
    assert corpus.identity == "model-samples"
    assert "sampled from the model itself" in caplog.text
    texts = corpus.texts()
    assert all(isinstance(next(texts), str) for _ in range(3))
