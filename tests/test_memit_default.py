"""MEMIT on the real default model: ten CounterFact facts in one batch."""
import pytest
import torch

from memit import WeightDeltas, apply_memit_to_model, edit_model
from memit.predict import score_continuations


def _pairs(records, prompts_of):
    prompts, new, true = [], [], []
    for record in records:
        rewrite = record["requested_rewrite"]
        for prompt in prompts_of(record):
            prompts.append(prompt)
            new.append(" " + rewrite["target_new"]["str"])
            true.append(" " + rewrite["target_true"]["str"])
    return prompts, new, true


def new_beats_true(model, tok, records, prompts_of) -> list[bool]:
    """Per prompt: does target_new have a lower mean token NLL than target_true?"""
    prompts, new, true = _pairs(records, prompts_of)
    scores_new = score_continuations(model, tok, prompts, new)
    scores_true = score_continuations(model, tok, prompts, true)
    return [a.mean_nll < b.mean_nll for a, b in zip(scores_new, scores_true)]


def rewrite_prompts(record):
    rewrite = record["requested_rewrite"]
    return [rewrite["prompt"].replace("{}", rewrite["subject"])]


def neighborhood_prompts(record):
    return record["neighborhood_prompts"]


@pytest.fixture(scope="module")
def edited(default_model, default_hparams, counterfact_records):
    """The default model with ten facts edited; reverted when the module's tests are done."""
    model, tok = default_model
    records = counterfact_records[:10]
    original = {k: v.clone() for k, v in model.state_dict().items()}
    before = {
        "rewrite": new_beats_true(model, tok, records, rewrite_prompts),
        "neighborhood": new_beats_true(model, tok, records, neighborhood_prompts),
    }
    deltas = edit_model(model, tok, records, default_hparams)
    yield model, tok, records, deltas, before, original
    if deltas.applied:
        deltas.revert(model)


def test_ten_facts_are_written(edited):
    model, tok, records, _, before, _ = edited
    assert sum(before["rewrite"]) < 9  # the unedited model mostly prefers the true facts
    assert sum(new_beats_true(model, tok, records, rewrite_prompts)) >= 9


def test_the_edit_reports_how_much_of_its_targets_it_wrote(edited, default_hparams):
    """Ten facts are far inside five layers' 1,536 key dimensions: the solves write nearly all
    of each layer's share, and the change z − h is left mostly written."""
    fit = edited[3].manifest["fit"]
    assert set(fit) == {f"layer{layer}" for layer in default_hparams.layers} | {"unwritten"}
    assert all(0 <= v < 1 for v in fit.values())
    assert fit["unwritten"] < 0.25, fit


def test_neighbourhood_keeps_its_true_facts(edited):
    model, tok, records, _, before, _ = edited
    after = new_beats_true(model, tok, records, neighborhood_prompts)
    kept = [not a for b, a in zip(before["neighborhood"], after) if not b]
    assert len(kept) >= 30
    assert sum(kept) / len(kept) >= 0.8


def test_only_the_edit_layers_change(edited, default_hparams):
    model, _, _, deltas, _, original = edited
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in default_hparams.layers}
    assert changed == set(deltas.deltas)


def test_saved_deltas_reload_and_reapply_to_the_same_weights(edited, tmp_path):
    model, _, _, deltas, _, original = edited
    edited_weights = {k: model.state_dict()[k].clone() for k in deltas.deltas}
    deltas.save(tmp_path / "edit")
    loaded = WeightDeltas.load(tmp_path / "edit")
    assert loaded.manifest["algorithm"] == "MEMIT" and len(loaded.manifest["requests"]) == 10
    deltas.revert(model)
    loaded.apply(model)
    assert all(torch.equal(model.state_dict()[k], w) for k, w in edited_weights.items())
    loaded.revert(model)
    deltas.apply(model)


def test_revert_restores_every_weight_bit_for_bit(edited):
    model, _, _, deltas, _, original = edited
    deltas.revert(model)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="not applied"):
        deltas.revert(model)


def test_paper_entry_point_with_copy_leaves_the_input_model_alone(default_model, default_hparams, counterfact_records):
    model, tok = default_model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    record = counterfact_records[20]
    edited_model, orig_weights = apply_memit_to_model(model, tok, [record], default_hparams, copy=True, return_orig_weights=True)
    assert edited_model is not model
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert set(orig_weights) == {f"model.layers.{i}.mlp.down_proj.weight" for i in default_hparams.layers}
    assert all(torch.equal(w, original[k]) for k, w in orig_weights.items())
    assert new_beats_true(edited_model, tok, [record], rewrite_prompts) == [True]
