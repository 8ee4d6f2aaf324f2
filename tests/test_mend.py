"""MEND on the real default model: the gradient factors it reads, a network trained for a
few steps that then changes a CounterFact fact and reverts exactly, and a clear error when
no network was trained."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from memit import edit_model
from memit.cli import main
from memit.editing.mend.gradients import gradient_factors
from memit.editing.mend.hparams import MENDHyperParams
from memit.editing.mend.network import MENDNetwork
from memit.editing.mend.train import train_mend
from memit.editing.prompts import TargetBatch
from memit.evaluation.datasets import load_cases, training_examples
from memit.models import ModelLayout

from .conftest import DATA_DIR
from .test_architectures import CONFIGS, tiny
from .test_methods import _assert_same, _margin, _snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The smallest MEND CounterFact split, as training data for a few steps.
CF_MEND_VAL = DATA_DIR / "counterfact_mend" / "counterfact-val.json"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradient_factors_multiply_to_the_weight_gradient(name, default_model):
    """Σ δ uᵀ over the kept tokens is the gradient of the summed target NLL for each weight,
    in the weight's own orientation (GPT-2's Conv1D stores it transposed)."""
    _, tok = default_model
    model = tiny(name)
    layout, layers = ModelLayout.from_model(model), [1, 3]
    batch = TargetBatch.of(tok, [("The capital of France is", " Rome"), ("Danielle Darrieux speaks", " English")], model.device)
    factors = gradient_factors(model, layout, layers, batch)
    weights = [layout.mlp_out(model, layer).weight for layer in layers]
    loss = batch.nll(model(**batch.inputs).logits) * batch.n_sequences
    expected = torch.autograd.grad(loss, weights)
    for layer, grad in zip(layers, expected):
        keys, grads = factors[layout.weight_name(layer)]
        assert keys.shape[0] == grads.shape[0] < batch.inputs["attention_mask"].sum()
        torch.testing.assert_close(layout.as_weight(grads.T @ keys), grad, rtol=1e-4, atol=1e-7)


@pytest.fixture(scope="module")
def trained_network(tmp_path_factory):
    """A small network trained for a few steps through ``memit train-mend``."""
    folder = tmp_path_factory.mktemp("mend")
    hparams = dataclasses.replace(
        MENDHyperParams.preset("SmolLM2-135M-Instruct"), rank=32, train_steps=30, train_batch_size=4, edit_lr=1e-3
    )
    hparams.save(folder / "hparams.json")
    result = CliRunner().invoke(main, [
        "train-mend", "--data-file", str(CF_MEND_VAL), "--hparams", str(folder / "hparams.json"), "--out", str(folder / "network"),
    ])
    assert result.exit_code == 0, result.output
    return dataclasses.replace(hparams, network=str(folder / "network"))


def test_trained_network_rewrites_a_fact_and_reverts_exactly(default_model, counterfact_records, trained_network, tmp_path):
    model, tok = default_model
    network = MENDNetwork.load(trained_network.network)
    assert network.metadata["trained"]["steps"] == 30
    assert all(bool(t.up.weight.any()) for t in network.transforms)  # trained away from the identity
    before = _snapshot(model)
    record = counterfact_records[0]
    assert _margin(model, tok, record) < 0
    deltas = edit_model(model, tok, [record], trained_network, algorithm="MEND")
    try:
        assert sorted(deltas.deltas) == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in trained_network.layers]
        trained_margin = _margin(model, tok, record)
        assert trained_margin > 0
    finally:
        deltas.revert(model)
    _assert_same(model, before)

    # The same network with its learned low-rank maps zeroed (as before training) edits less.
    for transform in network.transforms:
        torch.nn.init.zeros_(transform.up.weight)
        torch.nn.init.zeros_(transform.up.bias)
    network.save(tmp_path / "untrained")
    untrained = edit_model(model, tok, [record], dataclasses.replace(trained_network, network=str(tmp_path / "untrained")), algorithm="MEND")
    try:
        assert _margin(model, tok, record) < trained_margin
    finally:
        untrained.revert(model)
    _assert_same(model, before)


def test_mend_without_a_trained_network_is_a_clear_error(default_model, counterfact_records, tmp_path):
    model, tok = default_model
    hparams = dataclasses.replace(MENDHyperParams.preset("SmolLM2-135M-Instruct"), network=str(tmp_path / "none"))
    before = _snapshot(model)
    with pytest.raises(FileNotFoundError, match=r"hparams.network: no trained MEND network in .*memit train-mend"):
        edit_model(model, tok, [counterfact_records[0]], hparams, algorithm="MEND")
    _assert_same(model, before)


class Interrupt(Exception):
    pass


def test_killed_training_continues_from_its_checkpoint_to_the_same_network(default_model, tmp_path):
    _, tok = default_model
    model = tiny("llama_tied")
    layout = ModelLayout.from_model(model)
    hparams = dataclasses.replace(
        MENDHyperParams.preset("SmolLM2-135M-Instruct"), layers=[2, 3], rank=8, train_steps=6, train_batch_size=2
    )
    examples = training_examples(load_cases("cf-mend", CF_MEND_VAL, limit=20)[2], "cf-mend")
    whole = train_mend(model, tok, layout, hparams, examples)

    def stop_after_five(step):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_mend(model, tok, layout, hparams, examples, checkpoint_dir=tmp_path, checkpoint_every=2, on_step=stop_after_five)
    steps: list[int] = []
    resumed = train_mend(model, tok, layout, hparams, examples, checkpoint_dir=tmp_path, checkpoint_every=2, on_step=steps.append)
    assert steps == [5, 6]  # from the checkpoint of step 4
    expected = whole.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match=r"checkpoint: .* belongs to another training"):
        train_mend(model, tok, layout, dataclasses.replace(hparams, rank=4), examples, checkpoint_dir=tmp_path)
