"""Evaluation runs on the default model: resume after an interruption, sequential batches,
summaries and the command line."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from click.testing import CliRunner

from memit.cli import main
from memit.evaluation.datasets import load_cases
from memit.evaluation.runner import RunConfig, RunError, RunHooks, editable_cases, run_evaluation
from memit.evaluation.summary import JSON_KEYS, summarize_run

from ..conftest import DATA_DIR

CF_MEND = DATA_DIR / "counterfact_mend" / "counterfact-val.json"


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def fast_hparams(default_hparams):
    # Fewer optimisation steps: these tests check the bookkeeping, not the edit quality.
    return dataclasses.replace(default_hparams, v_num_grad_steps=2)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "mlp.down_proj" in k}


def test_interrupted_run_resumes_without_recomputing(default_model, fast_hparams, tmp_path):
    model, tok = default_model
    before = _weights(model)
    config = RunConfig(dataset="cf-mend", data_file=str(CF_MEND), num_edits=1, limit=2, out=str(tmp_path), skip_generation=True)
    done: list = []

    def stop_after_one(path):
        done.append(path)
        raise Interrupt

    with pytest.raises(Interrupt):
        run_evaluation(config, model, tok, fast_hparams, hooks=RunHooks(on_case_done=stop_after_one))
    # The interrupted edit was reverted; the finished case is on disk, the other is not.
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    run_dir = tmp_path / "MEMIT" / "run_000"
    files = sorted(run_dir.glob("case_*.json"))
    assert len(files) == 1 and not list(run_dir.glob(".*.tmp"))
    stamps = {f: f.stat().st_mtime_ns for f in files}

    edited: list = []
    resumed = dataclasses.replace(config, continue_from_run="run_000")
    out = run_evaluation(resumed, model, tok, fast_hparams, hooks=RunHooks(on_edit=lambda batch: edited.append([c.case_id for c in batch])))
    assert out == run_dir
    assert len(edited) == 1  # only the unfinished case was edited and evaluated
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert len(list(run_dir.glob("case_*.json"))) == 2
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())

    # A finished run continued again does nothing.
    edited.clear()
    run_evaluation(resumed, model, tok, fast_hparams, hooks=RunHooks(on_edit=lambda batch: edited.append(batch)))
    assert edited == []

    # Unedited-model metrics are cached for later runs on the same model and data file.
    cached = sorted((tmp_path / ".pre_cache").glob("*/*/case_*.json"))
    assert [c.name for c in cached] == sorted(f.name for f in run_dir.glob("case_*.json"))
    for c in cached:
        assert json.loads((run_dir / c.name).read_text())["pre"] == json.loads(c.read_text())

    record = json.loads(files[0].read_text())
    assert {"pre", "post", "requested_rewrite", "case_id"} <= record.keys()
    efficacy_prompts = record["post"]["prompts"]["efficacy"]
    assert efficacy_prompts and record["post"]["efficacy_success"] == pytest.approx(
        sum(p["nll_true"] > p["nll_new"] for p in efficacy_prompts) / len(efficacy_prompts))
    summary = summarize_run(run_dir)
    assert summary.num_cases == 2
    mean_post = sum(json.loads(f.read_text())["post"]["efficacy_success"] for f in run_dir.glob("case_*.json")) / 2
    assert summary.value("post", "efficacy_success") == pytest.approx(mean_post)

    result = CliRunner().invoke(main, ["summarize", "--json", str(run_dir)])
    assert result.exit_code == 0, result.output
    (obj,) = json.loads(result.output)
    for key in JSON_KEYS:
        assert set(obj[key]) == {"pre", "post"}
    assert obj["num_cases"] == {"pre": 2, "post": 2}
    table = CliRunner().invoke(main, ["summarize", str(run_dir)])
    assert "Efficacy success" in table.output and "Score" in table.output


def test_sequential_batches_and_reuse_of_a_finished_edit(default_model, fast_hparams, tmp_path):
    """Two batches applied one after the other, evaluated together; interrupted after the
    first case is written, the continued run reloads the saved edits instead of editing."""
    model, tok = default_model
    before = _weights(model)
    edits: list = []
    config = RunConfig(dataset="cf-mend", data_file=str(CF_MEND), num_edits=1, sequential_batches=2, limit=2,
                       out=str(tmp_path), skip_generation=True)

    def stop(path):
        raise Interrupt

    with pytest.raises(Interrupt):
        run_evaluation(config, model, tok, fast_hparams, hooks=RunHooks(on_edit=lambda b: edits.append(len(b)), on_case_done=stop))
    assert edits == [1, 1]
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    run_dir = tmp_path / "MEMIT" / "run_000"
    assert len(list((run_dir / ".deltas").glob("*/batch_*/deltas.safetensors"))) == 2
    first = next(run_dir.glob("case_*.json"))
    stamp = first.stat().st_mtime_ns

    edits.clear()
    run_evaluation(dataclasses.replace(config, continue_from_run=str(run_dir)), model, tok, fast_hparams,
                   hooks=RunHooks(on_edit=lambda b: edits.append(len(b))))
    assert edits == []  # both saved edits were reused
    assert first.stat().st_mtime_ns == stamp
    records = [json.loads(f.read_text()) for f in sorted(run_dir.glob("case_*.json"))]
    assert len(records) == 2
    assert all(len(r["grouped_case_ids"]) == 2 and r["sequential_batches"] == 2 for r in records)
    assert all(r["update"]["norm"] > 0 and 0 < r["update"]["relative"] < 1 for r in records)
    # The first case was written by the run that optimised the target vectors, the second by the
    # continued run that reloaded the edits.
    seconds = {r["case_id"]: r["time"]["target_seconds"] for r in records}
    assert seconds[json.loads(first.read_text())["case_id"]] > 0 and min(seconds.values()) == 0
    assert not (run_dir / ".deltas").exists()
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    params = json.loads((run_dir / "params.json").read_text())
    assert params["config"]["sequential_batches"] == 2 and params["hparams"]["v_num_grad_steps"] == 2
    assert params["planned_cases"] == len(records)  # how a report tells a finished run


def test_sequential_alphaedit_continued_between_batches_preserves_the_first(default_model, default_hparams, tmp_path, caplog):
    """Killed before its second batch, the continued run reloads the first batch with its keys
    and makes the second AlphaEdit edit on top of it, as an uninterrupted run would."""
    from memit import AlphaEditHyperParams

    model, tok = default_model
    before = _weights(model)
    hparams = AlphaEditHyperParams.preset("SmolLM2-135M-Instruct")
    hparams.mom2_n_samples, hparams.v_num_grad_steps = default_hparams.mom2_n_samples, 2
    config = RunConfig(alg="AlphaEdit", dataset="cf-mend", data_file=str(CF_MEND), num_edits=1, sequential_batches=2,
                       limit=2, out=str(tmp_path), skip_generation=True)
    edits: list = []

    def stop_at_the_second_batch(batch):
        edits.append(batch)
        if len(edits) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_evaluation(config, model, tok, hparams, hooks=RunHooks(on_edit=stop_at_the_second_batch))
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    run_dir = tmp_path / "AlphaEdit" / "run_000"
    (first,) = (run_dir / ".deltas").glob("*/batch_0")
    assert (first / "edit_state.safetensors").is_file() and not list(run_dir.glob("case_*.json"))

    edits.clear()
    with caplog.at_level(logging.INFO, logger="memit.editing.alphaedit.main"):
        run_evaluation(dataclasses.replace(config, continue_from_run=str(run_dir)), model, tok, hparams,
                       hooks=RunHooks(on_edit=edits.append))
    assert len(edits) == 1  # only the second batch was edited
    assert "preserving the keys of 1 earlier edit(s)" in caplog.text
    assert len(list(run_dir.glob("case_*.json"))) == 2
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_evaluate_rejects_a_file_that_fits_no_schema(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {"case_id": 0, "prompt": "Toko Yasuda, the", "subject": "Toko Yasuda", "target_new": "piano", "ground_truth": "guitar",
         "rephrase_prompt": "Toko Yasuda plays", "locality_prompt": "John Lennon plays", "locality_ground_truth": "guitar"},
        {"case_id": 1, "prompt": "Danielle Darrieux speaks", "subject": "Danielle Darrieux", "target_new": "English",
         "ground_truth": "French", "rephrase_prompt": "She speaks"},
    ]))
    result = CliRunner().invoke(main, ["evaluate", "--data-file", str(bad), "--out", str(tmp_path)])
    assert result.exit_code != 0
    message = result.output
    assert "record 1" in message and "locality_prompt" in message
    wrong = CliRunner().invoke(main, ["evaluate", "--dataset", "zsre", "--data-file", str(bad), "--out", str(tmp_path)])
    assert "record 0" in wrong.output and "'src'" in wrong.output
    assert not (tmp_path / "MEMIT").exists()


def test_a_case_contradicting_an_earlier_one_of_its_batch_is_skipped(default_model, caplog):
    # Cases 1004 and 2362 of counterfact-edit.json put the same subject in the same prompt with
    # different new targets: one batch cannot hold both; batches apart they are fine.
    _, _, cases = load_cases(None, DATA_DIR / "counterfact_mend" / "counterfact-edit.json")
    by_id = {c.case_id: c for c in cases}
    chosen = [by_id[1004], by_id[0], by_id[2362], by_id[1]]
    with caplog.at_level(logging.WARNING, logger="memit.evaluation.runner"):
        kept, skipped = editable_cases(chosen, default_model[1], limit=3)
    assert [c.case_id for c in kept] == [1004, 0, 1] and skipped == [2362]
    assert "Skipping case 2362" in caplog.text and "Hamburg" in caplog.text and "Shanghai" in caplog.text
    kept, skipped = editable_cases(chosen, default_model[1], limit=None, batch_size=2)
    assert [c.case_id for c in kept] == [1004, 0, 2362, 1] and skipped == []


def test_reused_edits_are_scored_again_and_never_stale(default_model, fast_hparams, tmp_path):
    model, tok = default_model
    before = _weights(model)
    edits: list = []
    hooks = RunHooks(on_edit=lambda batch: edits.append([c.case_id for c in batch]))
    config = RunConfig(dataset="cf-mend", data_file=str(CF_MEND), num_edits=1, sequential_batches=2, limit=2,
                       out=str(tmp_path), skip_generation=True, reuse_edits=True)
    raw = run_evaluation(config, model, tok, fast_hparams, hooks=hooks)
    assert len(edits) == 2
    # The same edits scored with the chat template: nothing is edited again.
    chat = run_evaluation(dataclasses.replace(config, chat_template=True), model, tok, fast_hparams, hooks=hooks)
    assert len(edits) == 2
    first = json.loads(next(chat.glob("case_*.json")).read_text())
    raw_first = json.loads((raw / next(chat.glob("case_*.json")).name).read_text())
    assert (first["prompt_format"], raw_first["prompt_format"]) == ("chat", "raw")
    # Case files keep the data set's prompts; the scores are those of the wrapped ones.
    assert first["post"]["prompts"]["efficacy"][0]["prompt"] == raw_first["post"]["prompts"]["efficacy"][0]["prompt"]
    assert first["post"]["prompts"]["efficacy"][0]["nll_new"] != raw_first["post"]["prompts"]["efficacy"][0]["nll_new"]
    # One batch at a time: the first case's edit is the same as before, the second case's is
    # not (before, it was made on top of the first) and is computed afresh.
    run_evaluation(dataclasses.replace(config, sequential_batches=1), model, tok, fast_hparams, hooks=hooks)
    assert len(edits) == 3 and edits[-1] == [edits[1][0]]
    # Other hyperparameters: another edit.
    other = dataclasses.replace(fast_hparams, v_num_grad_steps=3)
    run_evaluation(dataclasses.replace(config, sequential_batches=1, limit=1), model, tok, other, hooks=hooks)
    assert len(edits) == 4
    assert len(list((tmp_path / ".edit_cache").iterdir())) == 4
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())


def test_generation_interval_scores_fluency_on_every_nth_case(default_model, fast_hparams, tmp_path):
    from ..conftest import COUNTERFACT

    model, tok = default_model
    config = RunConfig(data_file=str(COUNTERFACT), num_edits=3, limit=3, generation_interval=2, generation_tokens=8,
                       generated_answers=False, out=str(tmp_path))
    run_dir = run_evaluation(config, model, tok, fast_hparams)
    records = [json.loads(f.read_text()) for f in sorted(run_dir.glob("case_*.json"), key=lambda f: int(f.stem.split("_")[1]))]
    order = [c["case_id"] for c in json.loads(COUNTERFACT.read_text())[:3]]
    by_id = {r["case_id"]: r for r in records}
    with_fluency = [cid for cid in order if "fluency" in by_id[cid]["post"] and "fluency" in by_id[cid]["pre"]]
    assert with_fluency == [order[0], order[2]]
    assert json.loads((run_dir / "params.json").read_text())["config"]["generation_interval"] == 2
    with pytest.raises(RunError, match="generation_interval"):
        RunConfig(generation_interval=0)


def test_score_interval_edits_every_case_and_scores_every_nth(default_model, fast_hparams, tmp_path):
    """A long sequential run scored on a sample: all three batches are edited, the first and
    third case scored, and the finished run is complete (continuing it edits nothing)."""
    from memit.evaluation.summary import format_table

    model, tok = default_model
    edits: list = []
    config = RunConfig(dataset="cf-mend", data_file=str(CF_MEND), num_edits=1, sequential_batches=3, limit=3, score_interval=2,
                       out=str(tmp_path), skip_generation=True, generated_answers=False)
    run_dir = run_evaluation(config, model, tok, fast_hparams, hooks=RunHooks(on_edit=lambda b: edits.append(b[0].case_id)))
    records = {r["case_id"]: r for r in (json.loads(f.read_text()) for f in run_dir.glob("case_*.json"))}
    assert len(edits) == 3
    assert sorted(records) == sorted([edits[0], edits[2]])
    assert all(r["grouped_case_ids"] == edits for r in records.values())
    summary = summarize_run(run_dir)
    assert summary.num_cases == 2 and "unfinished" not in format_table(summary)
    run_evaluation(dataclasses.replace(config, continue_from_run=str(run_dir)), model, tok, fast_hparams,
                   hooks=RunHooks(on_edit=lambda b: edits.append(b[0].case_id)))
    assert len(edits) == 3
    with pytest.raises(RunError, match="score_interval"):
        RunConfig(score_interval=0)


def test_sequential_checkpoints_reuse_the_earlier_batches(default_model, fast_hparams, tmp_path):
    """`memit scale --sequential-batches 1,2`: the second checkpoint reloads the first batch
    from the edit cache and adds one; a plot of edits so far is written."""
    hp = tmp_path / "hp.json"
    fast_hparams.save(hp)
    out = tmp_path / "out"
    args = ["scale", "--data-file", str(CF_MEND), "--num-edits", "1", "--sequential-batches", "1,2", "--hparams", str(hp),
            "--skip-generation", "--no-generated-answers", "--reuse-edits", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    params = [json.loads(p.read_text())["config"] for p in sorted((out / "MEMIT").glob("run_*/params.json"))]
    assert [(c["num_edits"], c["sequential_batches"], c["limit"]) for c in params] == [(1, 1, 1), (1, 2, 2)]
    assert len(list((out / ".edit_cache").iterdir())) == 2  # batch 1 once, batch 2 on top of it
    assert (out / "MEMIT" / "sequential_cf-mend.png").is_file()
    bad = CliRunner().invoke(main, [*args[:4], "1,2", *args[5:]])
    assert bad.exit_code != 0 and "one batch size" in bad.output


def test_update_size_is_the_norm_of_the_summed_change():
    """Sequential batches that cancel out leave no update: the norm is of the total change,
    not a sum of the batches' norms."""
    from memit.deltas import WeightDeltas
    from memit.evaluation.edit_cache import update_size

    layer = torch.nn.Linear(4, 3, bias=False)
    torch.nn.init.constant_(layer.weight, 2.0)
    change = torch.full((3, 4), 0.5)
    first = WeightDeltas({"weight": change}).apply(layer)
    assert update_size([first]) == pytest.approx({"norm": 0.5 * 12**0.5, "relative": 0.25})
    second = WeightDeltas({"weight": -change}, manifest={"fit": {"unwritten": 0.125}}).apply(layer)
    assert update_size([first, second]) == {"norm": 0.0, "relative": 0.0, "unwritten": 0.125}


def test_a_zsre_subject_merged_with_the_question_mark_is_edited_and_counted(default_model, tmp_path):
    # Record 9 asks 'What company made USS Leedstown (APA-56)?': the tokenizer merges the
    # subject's ")" with the "?", and the case is edited at ")?" instead of being skipped.
    from memit import MEMITHyperParams
    from memit.editing.base import EditOptions
    from memit.evaluation.runner import merged_subject_case_ids

    from ..conftest import ZSRE, random_llama

    tok = default_model[1]
    _, _, cases = load_cases("zsre", ZSRE)
    kept, skipped = editable_cases(cases[:10], tok, limit=None)
    assert [c.case_id for c in kept] == [c.case_id for c in cases[:10]] and skipped == []
    assert 9 in merged_subject_case_ids(kept, tok)
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([json.loads(ZSRE.read_text())[9]]))
    hparams = MEMITHyperParams(
        layers=[1, 2], v_num_grad_steps=5, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=20.0, kl_factor=0.0625,
        mom2_n_samples=20, mom2_max_tokens=64, mom2_update_weight=100.0, context_template_length_params=[[5, 2]],
        mom2_dataset="wikipedia-sample",
    )
    config = RunConfig(dataset="zsre", data_file=str(data), skip_generation=True, generated_answers=False, out=str(tmp_path))
    run_dir = run_evaluation(config, random_llama(tok, num_layers=4, seed=3), tok, hparams, EditOptions(stats_dir=str(tmp_path / "stats")))
    params = json.loads((run_dir / "params.json").read_text())
    assert params["skipped_case_ids"] == [] and params["merged_subject_case_ids"] == [0]
    summary = summarize_run(run_dir)
    assert summary.num_cases == 1 and summary.to_json()["merged_subject_cases"] == 1


def test_evaluate_says_how_to_continue_and_that_command_continues_the_run(default_model, fast_hparams, tmp_path):
    import shlex

    hparams = tmp_path / "hparams.json"
    fast_hparams.save(hparams)
    args = ["evaluate", "--data-file", str(CF_MEND), "--limit", "1", "--skip-generation", "--no-generated-answers",
            "--hparams", str(hparams), "--out", str(tmp_path)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    line = next(line for line in first.output.splitlines() if "continue it with: " in line)
    again = shlex.split(line.split("continue it with: ", 1)[1])
    assert again[:2] == ["memit", "evaluate"]
    second = CliRunner().invoke(main, again[1:])
    assert second.exit_code == 0, second.output
    assert f"Results in {tmp_path / 'MEMIT' / 'run_000'}" in second.output
    assert not (tmp_path / "MEMIT" / "run_001").exists()


def test_a_hyperparameter_added_later_keys_an_edit_only_when_changed(default_model, default_hparams):
    from memit.editing.base import EditOptions
    from memit.editing.methods import get_editor_class
    from memit.evaluation.edit_cache import edit_key
    from memit.requests import parse_requests

    model, _ = default_model
    requests = parse_requests([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}])
    editor_cls = get_editor_class("MEMIT")

    def key(hparams) -> str:
        return edit_key(editor_cls(hparams, EditOptions()), model, requests, [])

    # At its default the new setting leaves the key as it was before the setting existed.
    class Before(type(default_hparams)):
        def to_dict(self):
            return {k: v for k, v in super().to_dict().items() if k != "keys_in_prompt_forms"}

    assert key(default_hparams) == key(Before(**default_hparams.to_dict()))
    assert key(dataclasses.replace(default_hparams, keys_in_prompt_forms=True)) != key(default_hparams)
