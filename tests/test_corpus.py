"""Corpus sources for key statistics: the packaged sample, files, and what happens when a
corpus cannot be loaded."""
import itertools
import logging

import pytest
import torch

from memit.errors import MissingFileError
from memit.models.layout import ModelLayout
from memit.stats import CorpusError, collect_second_moments, load_corpus, resolve_corpus
from tests.conftest import SHARED_CORPUS, random_llama


def test_packaged_sample_is_the_default_and_gives_the_shared_files_statistics(default_model):
    model, tok = default_model
    packaged = resolve_corpus(None, "wikipedia-sample")
    assert packaged.identity.startswith("wikipedia_en_2015_sample2000.jsonl.gz-")
    assert sum(1 for _ in packaged.texts()) == 2000
    if not SHARED_CORPUS.is_file():
        pytest.skip("the shared Wikipedia sample is not beside the project")
    # The packaged texts are the first articles of the shared file, cut where 256-token samples stop reading.
    layout = ModelLayout.from_model(model)
    stats = [collect_second_moments(model, tok, layout, [3], c.texts(), 24, 256)[0][3] for c in (packaged, load_corpus(SHARED_CORPUS))]
    torch.testing.assert_close(stats[0], stats[1], rtol=0, atol=0)


def test_local_jsonl_gz_corpus_yields_article_texts(tmp_path):
    path = tmp_path / "mini.txt"
    path.write_text("first text\n\nsecond text\n")
    corpus = load_corpus(str(path))
    assert list(corpus.texts()) == ["first text", "second text"]
    assert corpus.identity.startswith("mini.txt-")


def test_a_corpus_the_user_names_must_load(tmp_path):
    with pytest.raises(MissingFileError, match="corpus: file .*missing.jsonl.gz does not exist"):
        resolve_corpus(str(tmp_path / "missing.jsonl.gz"))
    with pytest.raises(CorpusError, match="corpus 'no-such-dataset': .*(datasets|hub)"):
        resolve_corpus("no-such-dataset")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n')
    with pytest.raises(CorpusError, match="line 1 has no 'text' field"):
        next(resolve_corpus(str(bad)).texts())


def test_only_the_presets_default_falls_back_to_the_packaged_sample(caplog):
    with caplog.at_level(logging.WARNING):
        corpus = resolve_corpus(None, "no-such-dataset")
    assert corpus.identity == load_corpus("wikipedia-sample").identity
    assert "no-such-dataset" in caplog.text and "packaged with memit" in caplog.text


def test_model_samples_are_an_explicit_choice(default_model):
    tiny = random_llama(num_layers=1, head_scale=1.0, vocab_size=49152)
    with pytest.raises(CorpusError, match="needs the model"):
        load_corpus("model-samples")
    tok = default_model[1]
    corpus = load_corpus("model-samples", tiny, tok)
    first = list(itertools.islice(corpus.texts(), 3))
    assert first == list(itertools.islice(corpus.texts(), 3))  # seeded: the statistics can be recomputed
    # Distinct texts of about the sampled length (128 tokens).
    assert len(set(first)) == 3 and all(len(tok(text)["input_ids"]) >= 64 for text in first)
