"""The fast paths compute what the reference paths compute: target vectors and key statistics."""
from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from memit import ModelLayout, parse_requests
from memit.editing.context import get_context_templates
from memit.editing.targets import compute_targets
from memit.stats import collect_second_moments, load_corpus

Z_LAYER = 8
STEPS = 3
# A request optimised in a padded batch sums its attention in another order than alone; over
# the Adam steps single entries drift by up to about 1e-3 (measured 9e-4 on entries up to 1).
BATCH_ATOL = 2e-3


@pytest.fixture(scope="module")
def setup(default_model, default_hparams, counterfact_records):
    model, tok = default_model
    hparams = copy.deepcopy(default_hparams)
    hparams.v_num_grad_steps = STEPS
    layout = ModelLayout.from_model(model)
    templates = get_context_templates(model, tok, hparams.context_template_length_params)
    requests = parse_requests(counterfact_records[:2])
    return model, tok, layout, hparams, templates, requests


def _targets(setup, requests, **kwargs):
    model, tok, layout, hparams, templates, _ = setup
    return compute_targets(model, tok, layout, requests, hparams, templates, Z_LAYER, **kwargs)


def test_fast_targets_equal_plain(setup):
    requests = setup[-1]
    plain = _targets(setup, requests, batch_size=1, fast=False)
    fast = _targets(setup, requests, batch_size=len(requests), fast=True)
    assert plain.delta.abs().max() > 0.1  # the optimisation moved
    torch.testing.assert_close(fast.init, plain.init, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.delta, plain.delta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.final_loss, plain.final_loss, atol=1e-3, rtol=1e-3)


def test_batch_equals_each_alone(setup):
    requests = setup[-1]
    together = _targets(setup, requests, batch_size=len(requests), fast=True)
    for i, request in enumerate(requests):
        alone = _targets(setup, [request], batch_size=1, fast=True)
        torch.testing.assert_close(together.delta[i : i + 1], alone.delta, atol=BATCH_ATOL, rtol=1e-3)


def test_results_keep_request_order_when_batches_are_sorted_by_length(setup, counterfact_records):
    requests = parse_requests(counterfact_records[:3])  # suffix lengths differ: batches are reordered
    batched = _targets(setup, requests, batch_size=2, fast=True)
    for i, request in enumerate(requests):
        alone = _targets(setup, [request], batch_size=1, fast=True)
        torch.testing.assert_close(batched.init[i : i + 1], alone.init, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.delta[i : i + 1], alone.delta, atol=BATCH_ATOL, rtol=1e-3)


def test_requests_that_stop_early_leave_the_batch_without_changing_the_others(setup, monkeypatch):
    from memit.editing import targets

    requests = setup[-1]
    model, tok, layout, hparams, templates, _ = setup
    first_loss = compute_targets(model, tok, layout, requests, dataclasses.replace(hparams, v_num_grad_steps=1), templates, Z_LAYER).final_loss
    assert abs(first_loss[0] - first_loss[1]) > 0.1
    # A threshold between the two initial losses stops one request at step 0 and not the other.
    monkeypatch.setattr(targets, "EARLY_STOP_LOSS", float(first_loss.mean()))
    stopped = int(first_loss.argmin())
    together = _targets(setup, requests, batch_size=len(requests), fast=True)
    plain = _targets(setup, requests, batch_size=1, fast=False)
    assert together.delta[stopped].abs().max() == 0 and together.delta[1 - stopped].abs().max() > 0.1
    torch.testing.assert_close(together.delta, plain.delta, atol=BATCH_ATOL, rtol=1e-3)
    torch.testing.assert_close(together.final_loss, plain.final_loss, atol=1e-3, rtol=1e-3)


def test_one_pass_statistics_equal_per_layer_passes(default_model):
    model, tok = default_model
    layout = ModelLayout.from_model(model)
    corpus = load_corpus("wikipedia-sample")
    layers, n_samples, max_tokens = [2, 4], 6, 64
    together, count = collect_second_moments(model, tok, layout, layers, corpus.texts(), n_samples, max_tokens, batch_tokens=256)
    for layer in layers:
        alone, alone_count = collect_second_moments(model, tok, layout, [layer], corpus.texts(), n_samples, max_tokens)
        assert alone_count == count
        torch.testing.assert_close(together[layer], alone[layer], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "gpt_neox", "llama_tied", "mistral", "qwen2_untied"])
def test_fast_targets_equal_plain_across_architectures(arch, default_model):
    """The prefix keys/values and the replayed layers must work for every supported layout."""
    from tests.test_architectures import CONFIGS, tiny, tiny_hparams

    _, tok = default_model
    model = tiny(arch)
    layout = ModelLayout.from_model(model, CONFIGS[arch][1], CONFIGS[arch][2])
    hparams = tiny_hparams()
    hparams.v_num_grad_steps = STEPS
    templates = [["{}"], ["Some text. {}", "More and more text here. {}"]]
    requests = parse_requests([
        {"prompt": "The sport played by {} is", "subject": "LeBron James", "target_new": "football"},
        {"prompt": "{}, the capital city of", "subject": "Paris", "target_new": "Italy"},
    ])

    def run(**options):
        return compute_targets(model, tok, layout, requests, hparams, templates, 2, **options)

    plain, fast = run(batch_size=1, fast=False), run(batch_size=2, fast=True)
    torch.testing.assert_close(fast.delta, plain.delta, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(fast.final_loss, plain.final_loss, atol=1e-4, rtol=1e-3)


def test_statistics_shortcuts_change_nothing(default_model):
    """The tokenised character prefix and the half-computed symmetric product give the same numbers."""
    from memit.stats.second_moment import _gram, _tokenize_prefix

    _, tok = default_model
    texts = list(itertools.islice(load_corpus("wikipedia-sample").texts(), 40))
    for max_tokens in (64, 256):
        for text in texts:
            assert _tokenize_prefix(tok, text, max_tokens) == tok(text, truncation=True, max_length=max_tokens)["input_ids"]
    keys = torch.randn(300, 1536)
    torch.testing.assert_close(_gram(keys), keys.T @ keys, atol=1e-3, rtol=1e-5)


def test_bfloat16_autocast_targets_are_close_and_the_model_is_left_as_it_was(setup):
    model = setup[0]
    requests = setup[-1]
    attention = model.config._attn_implementation
    full = _targets(setup, requests, batch_size=len(requests), fast=True)
    reduced = _targets(setup, requests, batch_size=len(requests), fast=True, autocast=True)
    assert model.config._attn_implementation == attention
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # Adam's first steps are nearly sign steps, so compare directions rather than elements.
    assert torch.nn.functional.cosine_similarity(reduced.delta, full.delta).min() > 0.97
    assert (reduced.init - full.init).norm() / full.init.norm() < 0.05
    torch.testing.assert_close(reduced.final_loss, full.final_loss, atol=0.1, rtol=0.05)
