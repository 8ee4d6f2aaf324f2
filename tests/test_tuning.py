"""memit tune on a tiny random Llama: candidate windows, the search end to end, resuming after
a kill, the work folder's identity, the budget, and the command line."""
from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from memit import EditOptions, MEMITHyperParams
from memit.cli import main
from memit.errors import InputError
from memit.stats import load_corpus
from memit.tuning import TuneConfig, candidate_windows, tune
from memit.tuning.run import load_tuning_cases
from memit.tuning.search import TRIALS_FILE, _Search
from tests.conftest import COUNTERFACT, DATA_DIR, random_llama
from tests.test_tracing import _knowns_file

TRAIN = DATA_DIR / "counterfact_mend" / "counterfact-train.json"
CONFIG = TuneConfig(num_layers=2, lambdas=(1.0, 100.0), lambda_refinements=(10.0,), lr_factors=(2.0,), step_factors=(2.0,),
                    sample_sizes=(8, 16))
# A made-up trace of the default model's 30 layers: the MLP effect peaks at layer 6.
EFFECT = [0.01 * min(i, 12 - i) for i in range(30)]


@pytest.fixture(scope="module")
def tiny(default_model):
    return random_llama(default_model[1], num_layers=6, seed=11), default_model[1]


@pytest.fixture(scope="module")
def base():
    hp = MEMITHyperParams.preset("SmolLM2-135M-Instruct")
    return dataclasses.replace(hp, v_num_grad_steps=10, mom2_max_tokens=32)


@pytest.fixture(scope="module")
def cases(default_model):
    return load_tuning_cases(default_model[1], TRAIN, None, [COUNTERFACT], count=2)[0]


def test_candidate_windows_end_at_centre_on_and_start_at_the_peak():
    assert candidate_windows(EFFECT, 2) == [[5, 6], [6, 7]]
    assert candidate_windows([0.0, 0.1] + [0.3] + [0.0] * 7, 5) == [[0, 1, 2, 3, 4], [2, 3, 4, 5, 6]]
    assert candidate_windows([1.0, 0.5, 0.2], 3) == [[0, 1, 2]]
    with pytest.raises(InputError, match="num_layers"):
        candidate_windows(EFFECT, 31)


def test_a_refinement_keeps_the_current_setting_unless_beaten_beyond_noise():
    from memit.tuning.search import Trial, TrialResult

    def result(steps: int, per_case: list[float], norm: float) -> TrialResult:
        score = sum(per_case) / len(per_case)
        return TrialResult("z", Trial((4, 5), 0.5, steps, 1000.0, 100), score, score, score, score, 0.0, norm, per_case, 1.0)

    current = result(25, [1.0, 0.5, 0.5, 1.0] * 10, 10.0)
    slightly_better = result(40, [1.0, 0.5, 0.5, 1.0] * 9 + [1.0, 1.0, 0.5, 1.0], 10.5)  # one case of forty
    assert _Search.refine(current, [slightly_better, None]) is current
    clearly_better = result(15, [1.0] * 40, 12.0)
    assert _Search.refine(current, [slightly_better, clearly_better]) is clearly_better
    smaller_update = dataclasses.replace(current, trial=dataclasses.replace(current.trial, v_lr=1.0), update_norm=9.0)
    assert _Search.refine(current, [smaller_update]) is smaller_update


def test_tuning_cases_leave_out_the_evaluation_files(tiny):
    cases, _ = load_tuning_cases(tiny[1], TRAIN, None, [COUNTERFACT], count=50)
    evaluation = json.loads(COUNTERFACT.read_text())
    subjects = {r["requested_rewrite"]["subject"] for r in evaluation}
    assert len(cases) == 50 and not subjects & {c.request.subject for c in cases}
    assert not {r["case_id"] for r in evaluation} & {c.case_id for c in cases}
    with pytest.raises(InputError, match="edits"):
        load_tuning_cases(tiny[1], TRAIN, None, [TRAIN], count=1)


def test_tune_finds_the_best_setting_and_resumes_after_a_kill(default_model, base, cases, tmp_path):
    model, tok = default_model
    options = EditOptions(stats_dir=str(tmp_path / "stats"), batch_size=4)
    corpus = load_corpus("wikipedia-sample")
    work = tmp_path / "work"
    result = tune(model, tok, cases, base, EFFECT, corpus, work, CONFIG, options)

    hp = result.hparams
    assert hp.layers in candidate_windows(EFFECT, 2)
    largest = [r for r in result.results if r.trial.mom2_n_samples == 16]
    setting = (tuple(hp.layers), hp.v_lr, hp.v_num_grad_steps, hp.mom2_update_weight)
    best = next(r for r in largest if (r.trial.layers, r.trial.v_lr, r.trial.v_num_grad_steps, r.trial.mom2_update_weight) == setting)
    # No other setting beats it beyond noise (one within noise may rank a little higher).
    assert _Search.refine(best, largest) is best
    assert hp.mom2_n_samples in (8, 16)
    # The edits move the model towards the new targets. (Of these two cases the unedited model
    # already prefers the new target on the edit prompts, and success rates on two cases tie
    # easily, so the probability margin is what shows it. Which setting wins differs with the
    # CPU's rounding: its margin gain was over 0.05 on an AVX-512 machine, 0.027 on an AVX2 one.)
    assert best.magnitude > result.unedited["magnitude"] + 0.02, (best, result.unedited)
    assert {r.stage for r in result.results} == {"layers", "lambda", "z", "samples"}
    assert len(result.results) == 2 * 2 + 1 + 2 + 1
    samples_trial = next(r for r in result.results if r.stage == "samples")
    assert samples_trial.update_change is not None and samples_trial.update_change > 0
    preset = result.preset()
    assert len(preset["provenance"]["trials"]) == len(result.results)
    assert MEMITHyperParams.from_dict(json.loads(json.dumps(preset))) == hp

    # A kill after all but two trials: the rerun measures those two and reuses the rest.
    records = json.loads((work / TRIALS_FILE).read_text())
    (work / TRIALS_FILE).write_text(json.dumps(records[:-2]))
    targets = {p.name: p.stat().st_mtime_ns for p in (work / "targets").rglob("*.safetensors")}
    again = tune(model, tok, cases, base, EFFECT, corpus, work, CONFIG, options)
    assert again.hparams == hp
    kept = {json.dumps(r["trial"], sort_keys=True): r["seconds"] for r in records[:-2]}
    rerun = json.loads((work / TRIALS_FILE).read_text())
    assert len(rerun) == len(records)
    assert all(r["seconds"] == kept[json.dumps(r["trial"], sort_keys=True)] for r in rerun[:-2])
    assert {p.name: p.stat().st_mtime_ns for p in (work / "targets").rglob("*.safetensors")} == targets

    with pytest.raises(InputError, match="work_dir.*lambdas"):
        tune(model, tok, cases, base, EFFECT, corpus, work, dataclasses.replace(CONFIG, lambdas=(5.0,)), options)
    with pytest.raises(InputError, match="budget_minutes"):
        tune(model, tok, cases, base, EFFECT, corpus, tmp_path / "none", dataclasses.replace(CONFIG, budget_minutes=0), options)


def test_cli_tune_traces_then_writes_a_preset_that_edits(tiny, base, tmp_path):
    model, tok = tiny
    base = dataclasses.replace(base, v_num_grad_steps=4, context_template_length_params=[[4, 2]])
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    base_file = tmp_path / "base.json"
    base.save(base_file)
    out = tmp_path / "tuned.json"
    args = ["tune", "--model", str(folder), "--hparams", str(base_file), "--data-file", str(TRAIN), "--exclude", str(COUNTERFACT),
            "--edits", "2", "--num-layers", "2", "--lambdas", "1,100", "--sample-sizes", "8,16",
            "--known-file", str(_knowns_file(tmp_path, model, tok)), "--trace-facts", "2", "--trace-samples", "2",
            "--stats-dir", str(tmp_path / "stats"), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Chosen: layers" in result.output and "samples" in result.output
    assert (tmp_path / "tuned.tune" / "trace" / "average.json").is_file()
    preset = json.loads(out.read_text())
    assert preset["provenance"]["tool"] == "memit tune" and preset["provenance"]["excluded_files"] == [str(COUNTERFACT)]

    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}]))
    report = tmp_path / "report.json"
    edited = CliRunner().invoke(main, ["edit", "--model", str(folder), "--hparams", str(out), "--requests", str(requests),
                                       "--stats-dir", str(tmp_path / "stats"), "--report", str(report)])
    assert edited.exit_code == 0, edited.output
    (entry,) = json.loads(report.read_text())
    # The tuned preset's edit (4 steps on a tiny random model) makes the new target more likely.
    assert entry["post"]["target_new_prob"] > entry["pre"]["target_new_prob"]

    bad = CliRunner().invoke(main, [*args[:-2], "--lambdas", "1,x", "--out", str(out)])
    assert bad.exit_code != 0 and "lambdas" in bad.output
