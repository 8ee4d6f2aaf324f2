"""Memory: statistics batched by a token budget that never changes them, and edits that copy
only the matrices they edit."""
from __future__ import annotations

import dataclasses
from itertools import islice

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

from memit import EditOptions, ModelLayout, edit_model
from memit.cli import main
from memit.cli_options import STATS_BATCH_TOKENS, edit_options_from
from memit.editing.common import second_moments
from memit.errors import InputError
from memit.stats import collect_second_moments, load_corpus
from memit.stats.second_moment import DEFAULT_BATCH_TOKENS, _token_batches


def test_the_token_budget_does_not_change_the_statistics(default_model):
    model, tok = default_model
    layout = ModelLayout.from_model(model)
    corpus = load_corpus("wikipedia-sample")
    layers, n_samples, max_tokens = [3, 6], 12, 96
    small, small_count = collect_second_moments(model, tok, layout, layers, corpus.texts(), n_samples, max_tokens, batch_tokens=max_tokens)
    large, large_count = collect_second_moments(model, tok, layout, layers, corpus.texts(), n_samples, max_tokens, batch_tokens=4096)
    assert small_count == large_count > 0
    for layer in layers:
        assert small[layer].dtype == torch.float64
        torch.testing.assert_close(small[layer], large[layer], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("budget", [64, 100, 300, 1000])
def test_a_statistics_batch_never_exceeds_the_budget(default_model, budget):
    _, tok = default_model
    texts = list(islice(load_corpus("wikipedia-sample").texts(), 30))
    # Samples of mixed lengths (some short ones) so that batches hold different counts.
    texts += [" ".join(t.split()[: 5 + 7 * i]) for i, t in enumerate(texts[:10])]
    max_tokens = 64
    seen = 0
    for batch in _token_batches(tok, texts, max_tokens, budget):
        assert batch["input_ids"].numel() <= budget
        assert batch["input_ids"].shape[1] <= max_tokens
        seen += len(batch["input_ids"])
    assert seen == len(texts)


def test_a_sample_longer_than_the_budget_is_rejected_before_any_work(default_model, default_hparams, tmp_path):
    model, tok = default_model
    layout = ModelLayout.from_model(model)
    corpus = load_corpus("wikipedia-sample")
    with pytest.raises(InputError, match="stats_batch_tokens"):
        collect_second_moments(model, tok, layout, [3], corpus.texts(), 4, max_tokens=128, batch_tokens=100)
    # Through the editing options; mom2_max_tokens=None means the model's context length (2,048 here).
    hparams = dataclasses.replace(default_hparams, mom2_max_tokens=None)
    options = EditOptions(stats_dir=str(tmp_path), stats_batch_tokens=1024)
    with pytest.raises(InputError, match="2048 tokens"):
        second_moments(model, tok, layout, hparams, [4], corpus, options)
    assert not any(tmp_path.rglob("*.safetensors"))


def test_the_budget_is_an_option_of_every_editing_command():
    assert STATS_BATCH_TOKENS == DEFAULT_BATCH_TOKENS == EditOptions().stats_batch_tokens
    options = edit_options_from(corpus=None, stats_dir=None, stats_batch_tokens=1234, batch_size=16, plain=False, bf16=False)
    assert options.stats_batch_tokens == 1234
    assert edit_options_from(None, None, 8192, 16, False, False, use_cache=True).target_cache.endswith("targets")
    for command in ("edit", "demo", "evaluate", "scale", "tune"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "--stats-batch-tokens" in result.output and "--use-cache" in result.output, (command, result.output)


class ParameterCopies(TorchDispatchMode):
    """Records every whole-tensor copy (clone, dtype/device conversion, deepcopy) made of a
    model parameter's storage while active."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
        self.numel = {name: p.numel() for name, p in model.named_parameters()}
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default) and isinstance(args[0], torch.Tensor):
            name = self.storages.get(args[0].untyped_storage().data_ptr())
            if name is not None and args[0].numel() == self.numel[name]:
                self.copies.append(name)
        return out


def test_an_edit_keeps_copies_of_the_edited_matrices_only(default_model, default_hparams, counterfact_records):
    model, tok = default_model
    layout = ModelLayout.from_model(model)
    edited = {layout.weight_name(layer): model.get_parameter(layout.weight_name(layer)) for layer in default_hparams.layers}
    n_params = sum(1 for _ in model.parameters())
    # The statistics first (cached for the session), so that only the edit is watched.
    second_moments(model, tok, layout, default_hparams, default_hparams.layers, load_corpus("wikipedia-sample"), EditOptions())
    watch = ParameterCopies(model)
    with watch:
        deltas = edit_model(model, tok, counterfact_records[:2], default_hparams)
    try:
        # While editing: the originals restored after the layer-by-layer writes, then those
        # kept for revert; never a copy of any other parameter (no model copy).
        assert set(watch.copies) == set(edited)
        assert all(watch.copies.count(name) <= 2 for name in edited)
        assert sum(1 for _ in model.parameters()) == n_params
        # Held afterwards: originals of the edited matrices, one delta each and the edit's
        # keys (one row per request and layer, for later edits to preserve), nothing else.
        originals = deltas._originals
        assert set(originals) == set(deltas.deltas) == set(edited)
        edited_bytes = sum(p.numel() * p.element_size() for p in edited.values())
        assert sum(t.numel() * t.element_size() for t in originals.values()) == edited_bytes
        assert sum(t.numel() * t.element_size() for t in deltas.deltas.values()) == sum(p.numel() * 4 for p in edited.values())
        assert {name: tuple(k.shape) for name, k in deltas.state.items()} == {
            f"keys.layer{layer}": (2, p.shape[1]) for layer, p in zip(default_hparams.layers, edited.values())
        }
    finally:
        deltas.revert(model)


def test_one_pass_gives_the_statistics_of_several_corpus_sizes(default_model, tmp_path):
    from memit.stats import SecondMomentCache
    from memit.stats.corpus import Corpus

    model, tok = default_model
    layout = ModelLayout.from_model(model)
    corpus = load_corpus("wikipedia-sample")
    partial_sums_seen = []

    def texts_watching_for_saves():
        for text in corpus.texts():
            partial_sums_seen.append(any(tmp_path.rglob("partial_*")))
            yield text

    cache = SecondMomentCache(tmp_path)
    cache.ensure(model, tok, layout, [3, 6], Corpus(corpus.identity, texts_watching_for_saves), [6, 12], max_tokens=64)
    # A pass this short saves no running sums on the way: each save writes every layer's d x d sums.
    assert len(partial_sums_seen) >= 12 and not any(partial_sums_seen)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert len(files) == 4 and sum("_n6_" in f for f in files) == 2
    for n in (6, 12):
        alone, _ = collect_second_moments(model, tok, layout, [3, 6], corpus.texts(), n, 64)
        cached = cache.get(model, tok, layout, [3, 6], corpus, n, max_tokens=64)
        for layer in (3, 6):
            torch.testing.assert_close(cached[layer].double(), alone[layer], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(cache.get(model, tok, layout, [3], corpus, 6, max_tokens=64)[3],
                              cache.get(model, tok, layout, [3], corpus, 12, max_tokens=64)[3])


class _Killed(Exception):
    pass


def test_a_killed_statistics_pass_continues_from_its_last_save(default_model, tmp_path, caplog):
    from memit.stats import SecondMomentCache
    from memit.stats.corpus import Corpus

    model, tok = default_model
    layout = ModelLayout.from_model(model)
    corpus = load_corpus("wikipedia-sample")

    def killed_at_the_15th_text():
        for i, text in enumerate(corpus.texts()):
            if i == 15:
                raise _Killed
            yield text

    cache = SecondMomentCache(tmp_path)
    # 20 samples: the running sums are saved after every 2; the pass dies reading sample 15,
    # so the last save holds the first 14.
    with pytest.raises(_Killed):
        cache.ensure(model, tok, layout, [3, 6], Corpus(corpus.identity, killed_at_the_15th_text), [10, 20], max_tokens=64,
                     checkpoint_samples=2)
    assert len(list(tmp_path.rglob("partial_*.safetensors"))) == 1
    assert sorted(p.name.split("_n")[1].split("_")[0] for p in tmp_path.rglob("*down_proj*")) == ["10", "10"]
    with caplog.at_level("INFO", logger="memit.stats.second_moment"):
        cache.ensure(model, tok, layout, [3, 6], corpus, [10, 20], max_tokens=64)
    assert "continuing from the 14 samples" in caplog.text
    assert not list(tmp_path.rglob("partial_*"))
    whole, _ = collect_second_moments(model, tok, layout, [3, 6], corpus.texts(), 20, 64)
    resumed = cache.get(model, tok, layout, [3, 6], corpus, 20, max_tokens=64)
    for layer in (3, 6):
        torch.testing.assert_close(resumed[layer].double(), whole[layer], atol=1e-6, rtol=1e-5)
