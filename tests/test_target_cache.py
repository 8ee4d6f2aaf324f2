"""Target vectors cached per request: a hit reads the file, any changed key part misses, a
stopped computation resumes, and in sequential editing a target computed on the unedited
model is never reused for the edited one."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from memit import EditOptions, ModelLayout
from memit.cli import main
from memit.editing.common import context_templates
from memit.editing.target_cache import cache_cost
from memit.editing.targets import compute_targets
from memit.evaluation.runner import RunConfig, run_evaluation
from memit.requests import parse_requests
from memit.utils.devices import device_label
from tests.conftest import COUNTERFACT

REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": "English"}},
    {"prompt": "{} is located in the continent of", "subject": "Mount Kenya", "target_new": {"str": "Europe"}},
]


@pytest.fixture(scope="module")
def setting(default_model, default_hparams):
    model, tok = default_model
    hp = dataclasses.replace(default_hparams, v_num_grad_steps=6)
    return model, tok, ModelLayout.from_model(model), hp, context_templates(model, tok, hp, EditOptions())


def targets(setting, requests, cache_dir, **changes):
    model, tok, layout, hp, templates = setting
    layer = changes.pop("layer", hp.layers[-1])
    templates = changes.pop("templates", templates)
    return compute_targets(model, tok, layout, parse_requests(requests), dataclasses.replace(hp, **changes), templates, layer,
                           batch_size=4, cache_dir=cache_dir)


def files(folder):
    return sorted(folder.rglob("*.safetensors"))


def test_a_hit_reads_the_file_and_equals_the_computation(setting, tmp_path):
    first = targets(setting, REQUESTS, tmp_path)
    assert len(files(tmp_path)) == 3
    # Each file records its share of its batch's time, and where it was computed.
    [(device, (count, seconds))] = cache_cost(tmp_path).items()
    assert device == device_label(setting[0]) and count == 3 and seconds > 0
    uncached = targets(setting, REQUESTS, None)
    torch.testing.assert_close(first.delta, uncached.delta)
    # Each request's result does not depend on its batch, which is what makes the cache valid.
    alone = targets(setting, REQUESTS[1:2], None)
    assert float((alone.delta[0] - first.delta[1]).norm() / first.delta[1].norm()) < 1e-3

    # A planted value comes back: the second call reads the files instead of optimising.
    path = next(p for p in files(tmp_path) if torch.equal(load_file(str(p))["delta"], first.delta[2]))
    planted = {**load_file(str(path)), "delta": torch.full_like(first.delta[2], 7.0)}
    save_file(planted, str(path))
    again = targets(setting, REQUESTS, tmp_path)
    assert torch.equal(again.delta[2], planted["delta"]) and torch.equal(again.delta[:2], first.delta[:2])


def test_any_changed_key_part_misses(setting, tmp_path):
    model, _, layout, hp, templates = setting
    targets(setting, REQUESTS[:1], tmp_path)
    changed_target = [{**REQUESTS[0], "target_new": {"str": "tennis"}}]
    variants = [
        lambda: targets(setting, REQUESTS[:1], tmp_path, v_lr=0.25),
        lambda: targets(setting, REQUESTS[:1], tmp_path, v_num_grad_steps=5),
        lambda: targets(setting, REQUESTS[:1], tmp_path, kl_factor=0.5),
        lambda: targets(setting, REQUESTS[:1], tmp_path, layer=hp.layers[-1] - 1),
        lambda: targets(setting, REQUESTS[:1], tmp_path, templates=templates[:1]),
        lambda: targets(setting, changed_target, tmp_path),
    ]
    for count, variant in enumerate(variants, start=2):
        variant()
        assert len(files(tmp_path)) == count
    weight = layout.mlp_out(model, hp.layers[0]).weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    try:
        targets(setting, REQUESTS[:1], tmp_path)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert len(files(tmp_path)) == len(variants) + 2
    targets(setting, REQUESTS[:1], tmp_path)  # the weights are back: a hit again
    assert len(files(tmp_path)) == len(variants) + 2


def test_a_stopped_computation_resumes_with_the_missing_requests(setting, tmp_path):
    part = targets(setting, REQUESTS[:2], tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in files(tmp_path)}
    whole = targets(setting, REQUESTS, tmp_path)
    assert len(files(tmp_path)) == 3
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())
    assert torch.equal(whole.delta[:2], part.delta)


def test_sequential_edits_never_reuse_an_unedited_models_target(default_model, default_hparams, setting, tmp_path):
    model, tok = default_model
    cases = json.loads(COUNTERFACT.read_text())[:2]
    data_file = tmp_path / "cases.json"
    data_file.write_text(json.dumps(cases))
    hp = setting[3]
    cache = tmp_path / "targets"
    unedited = targets(setting, [c["requested_rewrite"] for c in cases], cache)
    assert len(files(cache)) == 2

    options = EditOptions(batch_size=4, target_cache=str(cache))
    config = RunConfig(model="default", data_file=str(data_file), num_edits=1, sequential_batches=2, skip_generation=True,
                       generated_answers=False, out=str(tmp_path / "runs"))
    run_evaluation(config, model, tok, hp, options)
    # The first batch meets the unedited model (a hit); the second the model edited by the
    # first, whose target is computed anew and differs.
    assert len(files(cache)) == 3
    new = next(p for p in files(cache) if not any(torch.equal(load_file(str(p))["delta"], d) for d in unedited.delta))
    assert not torch.allclose(load_file(str(new))["delta"], unedited.delta[1], atol=1e-3)


def test_cli_use_cache(tmp_path, default_model):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(REQUESTS[:1]))
    hp = tmp_path / "hp.json"
    from memit import MEMITHyperParams

    MEMITHyperParams.from_dict({**MEMITHyperParams.preset("SmolLM2-135M-Instruct").to_dict(), "v_num_grad_steps": 3,
                                "mom2_n_samples": 1000}).save(hp)
    args = ["edit", "--requests", str(requests), "--hparams", str(hp), "--target-cache", str(tmp_path / "z")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert len(files(tmp_path / "z")) == 1


def test_the_targets_command_fills_the_cache_that_an_evaluation_then_reads(tmp_path, default_model, default_hparams):
    model, tok = default_model
    data_file = tmp_path / "cases.json"
    data_file.write_text(json.dumps(json.loads(COUNTERFACT.read_text())[:2]))
    hp = tmp_path / "hp.json"
    default_hparams.save(hp)
    cache = tmp_path / "z"

    missing = CliRunner().invoke(main, ["targets", "--data-file", str(data_file), "--hparams", str(hp)])
    assert missing.exit_code != 0 and "--target-cache" in missing.output
    result = CliRunner().invoke(main, ["targets", "--data-file", str(data_file), "--hparams", str(hp), "--target-cache", str(cache)])
    assert result.exit_code == 0, result.output
    assert "2 target vectors" in result.output and len(files(cache)) == 2
    stamps = {p: p.stat().st_mtime_ns for p in files(cache)}

    config = RunConfig(model="default", data_file=str(data_file), num_edits=2, hparams=str(hp), skip_generation=True,
                       generated_answers=False, out=str(tmp_path / "runs"))
    run_dir = run_evaluation(config, model, tok, options=EditOptions(target_cache=str(cache)))
    # The edit found both targets cached: no file was added or rewritten, and no time spent on them.
    assert {p: p.stat().st_mtime_ns for p in files(cache)} == stamps
    records = [json.loads(p.read_text()) for p in run_dir.glob("case_*.json")]
    assert len(records) == 2 and all(r["time"]["target_seconds"] < 0.5 for r in records)
    assert all(r["post"]["efficacy_success"] == 1.0 for r in records), records
