"""Shared fixtures: the real default model, tiny random models, and the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_CORPUS = DATA_DIR / "wikipedia_en_2015_sample.jsonl.gz"
COUNTERFACT = DATA_DIR / "counterfact_subset400.json"
ZSRE = DATA_DIR / "zsre_mend_eval_subset700.json"
# Fewer corpus samples than the preset keeps the suite fast; the statistics are cached for the session.
TEST_STATS_SAMPLES = 1000

# Expensive artifacts (converted model, statistics, context templates) are cached across
# test runs in one folder; CI starts from an empty one.
os.environ.setdefault("MEMIT_HOME", str(REPO / ".cache" / "memit"))
# Key statistics come from the Wikipedia sample packaged with memit (the presets' corpus).
os.environ.pop("MEMIT_CORPUS", None)


@pytest.fixture(scope="session")
def default_model():
    from memit import load_model

    torch.manual_seed(0)
    return load_model("default")


@pytest.fixture(scope="session")
def default_hparams():
    from memit import MEMITHyperParams

    hparams = MEMITHyperParams.preset("SmolLM2-135M-Instruct")
    hparams.mom2_n_samples = TEST_STATS_SAMPLES
    return hparams


@pytest.fixture(scope="session")
def counterfact_records():
    import json

    return json.loads(COUNTERFACT.read_text())


def random_llama(tok=None, num_layers: int = 2, seed: int = 0, *, hidden: int = 32, mlp: int = 64, head_scale: float = 20.0, **config):
    """The tests' tiny random Llama: over ``tok``'s vocabulary (else ``vocab_size`` in
    ``config``), its vocabulary head scaled by ``head_scale`` so that its predictions are
    sharper than a random init gives; ``config``: further LlamaConfig fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tok is not None:
        config |= {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, **config)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    return model
