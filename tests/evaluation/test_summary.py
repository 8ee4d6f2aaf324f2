"""Summaries, the JSON output and the scaling plot from hand-made run folders."""
from __future__ import annotations

import json
import statistics

import pytest
from click.testing import CliRunner

from memit.cli import main
from memit.evaluation.runner import RunConfig
from memit.evaluation.scaling import cases_for, find_run, plot_scaling, scaling_series
from memit.evaluation.summary import RunSummary, format_comparison, format_table, summarize_run


def _make_run(folder, num_edits, cases, dataset="cf", alg="MEMIT", update=None):
    folder.mkdir(parents=True)
    config = {"alg": alg, "model": "default", "dataset": dataset, "num_edits": num_edits, "sequential_batches": 1}
    (folder / "params.json").write_text(json.dumps({"config": config, "hparams": {}}))
    for i, (pre, post) in enumerate(cases):
        record = {"case_id": i, "pre": pre, "post": post, **({"update": update} if update else {})}
        (folder / f"case_{i}.json").write_text(json.dumps(record))
    return folder


def _cf(eff, par, nei, flu=None):
    return {"efficacy_success": eff, "paraphrase_success": par, "neighborhood_success": nei,
            "efficacy_acc": eff / 2, "paraphrase_acc": 0.0, "neighborhood_acc": 1.0,
            "efficacy_magnitude": 0.1, "paraphrase_magnitude": 0.0, "neighborhood_magnitude": -0.1, "fluency": flu}


def test_summary_means_std_and_score(tmp_path):
    posts = [_cf(1.0, 0.5, 0.8, 6.0), _cf(1.0, 1.0, 0.6, 5.0), _cf(0.0, 0.5, 0.7, 4.0)]
    run = _make_run(tmp_path / "run_000", 3, [(_cf(0.0, 0.0, 0.9), p) for p in posts])
    s = summarize_run(run)
    assert s.num_cases == 3
    eff = [p["efficacy_success"] for p in posts]
    assert s.stats["post"]["efficacy_success"].mean == pytest.approx(statistics.fmean(eff))
    assert s.stats["post"]["efficacy_success"].std == pytest.approx(statistics.pstdev(eff))
    means = [statistics.fmean(p[k] for p in posts) for k in ("efficacy_success", "paraphrase_success", "neighborhood_success")]
    assert s.score("post") == pytest.approx(3 / sum(1 / m for m in means))
    assert s.score("pre") == 0.0
    assert s.value("post", "fluency") == pytest.approx(5.0) and "fluency" not in s.stats["pre"]
    table = format_table(s)
    assert "Score" in table and f"{100 * means[0]:.1f} ± " in table


def test_an_unfinished_run_says_how_many_cases_it_planned(tmp_path):
    run = _make_run(tmp_path / "run_000", 3, [(_cf(0.0, 0.0, 0.9), _cf(1.0, 1.0, 0.9))] * 2)
    params = json.loads((run / "params.json").read_text())
    for planned, said in ((5, "cases=2 of 5 (unfinished) "), (2, "cases=2 ")):
        (run / "params.json").write_text(json.dumps({**params, "planned_cases": planned}))
        assert said in format_table(summarize_run(run))


def test_compare_prints_a_row_per_run_and_the_unedited_model(tmp_path):
    one = _make_run(tmp_path / "run_000", 2, [(_cf(0.0, 0.0, 1.0, 5.0), _cf(1.0, 0.5, 0.5, 4.0))] * 2)
    seq = _make_run(tmp_path / "run_001", 1, [(_cf(0.0, 0.0, 1.0, 5.0), _cf(1.0, 1.0, 1.0, 3.0))])
    params = json.loads((seq / "params.json").read_text())
    params["config"]["sequential_batches"] = 10
    (seq / "params.json").write_text(json.dumps(params))
    for case, seconds in ((one / "case_0.json", 3.0), (one / "case_1.json", 4.0)):
        record = json.loads(case.read_text())
        record.update(grouped_case_ids=[0, 1], time={"edit_seconds": 30.0, "post_seconds": seconds}, update={"norm": 2.0, "relative": 0.0123})
        case.write_text(json.dumps(record))
    chat = _make_run(tmp_path / "run_002", 2, [({**_cf(0.0, 0.0, 0.5), "gen_efficacy": 0.0}, {**_cf(1.0, 1.0, 0.5), "gen_efficacy": 0.5})])
    params = json.loads((chat / "params.json").read_text())
    params["config"]["chat_template"] = True
    (chat / "params.json").write_text(json.dumps(params))
    result = CliRunner().invoke(main, ["summarize", "--compare", str(one), str(seq), str(chat)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert "| gen. efficacy | (mentioned) | gen. paraphrase | (mentioned) | gen. neighborhood | gen. unchanged | gen. says new |" in lines[0]
    # An unedited row per prompt format and number of cases, from the first run of that kind.
    assert lines[2] == "| unedited | - | raw | 2 | 0.0 | 0.0 | 100.0 | 0.0 | - | - | - | - | - | - | - | 500.0 | - | - | - |"
    assert lines[3] == "| unedited | - | raw | 1 | 0.0 | 0.0 | 100.0 | 0.0 | - | - | - | - | - | - | - | 500.0 | - | - | - |"
    assert lines[4] == "| unedited | - | chat | 1 | 0.0 | 0.0 | 50.0 | 0.0 | 0.0 | - | - | - | - | - | - | - | - | - | - |"
    assert lines[5] == "| MEMIT | 2 | raw | 2 | 100.0 | 50.0 | 50.0 | 60.0 | - | - | - | - | - | - | - | 400.0 | 0.0123 | 30 | 7 |"
    assert lines[6].startswith("| MEMIT | 10 x 1 sequential | raw | 1 | 100.0 | 100.0 | 100.0 | 100.0 | - | - | - | - | - | - | - | 300.0 |")
    assert lines[7].startswith("| MEMIT | 2 | chat | 1 | 100.0 | 100.0 | 50.0 | 75.0 | 50.0 |")


def test_summarize_json_for_zsre_has_null_success(tmp_path):
    zs = {"efficacy_acc": 0.5, "paraphrase_acc": 0.25, "neighborhood_acc": 1.0}
    run = _make_run(tmp_path / "run_000", 1, [(zs, {**zs, "efficacy_acc": 1.0})], dataset="zsre")
    result = CliRunner().invoke(main, ["summarize", "--json", str(run)])
    assert result.exit_code == 0, result.output
    (obj,) = json.loads(result.output)
    assert obj["efficacy_acc"] == {"pre": 0.5, "post": 1.0}
    assert obj["efficacy_success"] == {"pre": None, "post": None} and obj["score"] == {"pre": None, "post": None}
    assert obj["num_cases"] == {"pre": 1, "post": 1}
    # Compared without success rates: the accuracies (and portability) instead.
    lines = CliRunner().invoke(main, ["summarize", "--compare", str(run)]).output.strip().splitlines()
    assert lines[0].startswith("| method | edits | prompts | cases | efficacy acc | paraphrase acc | neighborhood acc | portability acc |")
    assert lines[3].startswith("| MEMIT | 1 | raw | 1 | 100.0 | 25.0 | 100.0 | - |")
    bad = CliRunner().invoke(main, ["summarize", str(tmp_path)])
    assert bad.exit_code != 0 and "params.json" in bad.output


def test_scaling_plot_and_run_reuse(tmp_path):
    runs = [_make_run(tmp_path / f"run_{i:03d}", n, [(_cf(0.0, 0.0, 0.8), _cf(1.0, 0.9 - i / 10, 0.7))] * 2)
            for i, n in enumerate((1, 10, 100))]
    png = plot_scaling([summarize_run(r) for r in runs], tmp_path / "plots" / "scale.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [cases_for(n, 10) for n in (1, 3, 10, 100)] == [10, 12, 10, 100]
    # A run with the same parameters and hyperparameters is found again.
    out = tmp_path / "results"
    config = RunConfig(dataset="cf-mend", data_file="/x.json", num_edits=10, limit=10, out=str(out))
    run = out / "MEMIT" / "run_000"
    run.mkdir(parents=True)
    from dataclasses import asdict

    (run / "params.json").write_text(json.dumps({"config": asdict(config), "hparams": {"a": 1}}))
    assert find_run(config, {"a": 1}) == run
    assert find_run(config, {"a": 2}) is None
    assert find_run(RunConfig(dataset="cf-mend", data_file="/x.json", num_edits=100, limit=100, out=str(out)), {"a": 1}) is None


def test_methods_share_the_scaling_panels(tmp_path):
    """`memit summarize --compare --plot`: a row and a line per method and batch size, the
    unedited line from the method with most points, panels only for what the runs recorded."""
    runs = []
    for alg, sizes in (("MEMIT", (100, 1, 10)), ("AlphaEdit", (1, 10))):
        for n in sizes:
            post = _cf(1.0, 0.5, 0.7 if alg == "MEMIT" else 0.6, flu=5.0)
            # Only MEMIT's runs recorded the share of the targets left unwritten.
            update = {"norm": 1.0, "relative": n / 100, **({"unwritten": n / 1000} if alg == "MEMIT" else {})}
            runs.append(_make_run(tmp_path / alg / f"run_{n:03d}", n, [(_cf(0.0, 0.0, 0.8 - n / 1000, flu=6.0), post)], alg=alg, update=update))
    series = scaling_series([summarize_run(r) for r in runs])
    assert list(series) == ["efficacy_success", "paraphrase_success", "neighborhood_success", "fluency", "update_relative", "update_unwritten"]
    assert series["update_unwritten"]["MEMIT"] == ([1, 10, 100], pytest.approx([0.1, 1.0, 10.0]))
    assert series["update_unwritten"]["AlphaEdit"] == ([1, 10], [None, None]) and "unedited" not in series["update_unwritten"]
    neighborhood = series["neighborhood_success"]
    assert neighborhood["MEMIT"] == ([1, 10, 100], [70.0, 70.0, 70.0])
    assert neighborhood["AlphaEdit"] == ([1, 10], [60.0, 60.0])
    assert neighborhood["unedited"] == ([1, 10, 100], pytest.approx([79.9, 79.0, 70.0]))
    assert series["fluency"]["MEMIT"][1] == [500.0] * 3
    png = tmp_path / "both.png"
    result = CliRunner().invoke(main, ["summarize", "--compare", "--plot", str(png), *map(str, runs)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in result.output.splitlines() if line.startswith(("| MEMIT", "| AlphaEdit"))]
    assert len(rows) == 5
    # Labels name the lines instead of the method: MEMIT's runs split into two settings.
    labelled = scaling_series([summarize_run(r) for r in runs], labels=["a", "b", "a", "c", "c"])
    assert labelled["efficacy_success"].keys() == {"a", "b", "c", "unedited"}
    assert labelled["neighborhood_success"]["a"] == ([10, 100], [70.0, 70.0])


def test_neighborhood_answers_compared_with_the_unedited_model(tmp_path):
    def answers(*said):
        return [{"group": g, "prompt": "p", "answers": ["x"], "generated": t, "exact": False, "first": False} for g, t in said]

    pre = {**_cf(0.0, 0.0, 1.0), "generated_answers": answers(
        ("efficacy", " Paris."), ("neighborhood", " Europe, and it is big."), ("neighborhood", " jazz music"),
        ("neighborhood", " the Beatles"))}
    post = {**_cf(1.0, 1.0, 1.0), "generated_answers": answers(
        ("efficacy", " Rome."), ("neighborhood", " Europe, while the rest..."), ("neighborhood", " Rome, of course"),
        ("neighborhood", " The Beatles.\nMore"))}
    run = _make_run(tmp_path / "run_000", 1, [(pre, post)])
    record = json.loads((run / "case_0.json").read_text())
    record["requested_rewrite"] = {"prompt": "{} is in", "subject": "s", "target_new": {"str": " Rome"}}
    (run / "case_0.json").write_text(json.dumps(record))
    s = summarize_run(run)
    # Heads "europe" = "europe", "jazz music" != "rome", "beatles" = "beatles": 2 of 3 unchanged.
    assert s.value("post", "gen_neighborhood_unchanged") == pytest.approx(2 / 3)
    assert s.value("pre", "gen_neighborhood_unchanged") is None
    # One of three neighborhood answers now starts with the new target " Rome".
    assert s.value("post", "gen_neighborhood_new") == pytest.approx(1 / 3) and s.value("pre", "gen_neighborhood_new") == 0.0
    # Case files written before the "mentioned" judgement get it from their stored answers
    # (every answer here is judged against "x", which none mentions).
    assert s.value("post", "gen_efficacy_mention") == 0.0 and s.value("pre", "gen_neighborhood_mention") == 0.0


def test_a_summary_rebuilt_from_its_record_reports_the_same(tmp_path):
    run = _make_run(tmp_path / "run_000", 2, [(_cf(0.0, 0.0, 1.0, 5.0), _cf(1.0, 0.5, 0.5, 4.0)), (_cf(0.0, 1.0, 1.0), _cf(1.0, 1.0, 0.0))])
    for i in range(2):
        case = run / f"case_{i}.json"
        record = json.loads(case.read_text())
        record.update(grouped_case_ids=[0, 1], time={"edit_seconds": 30.0, "target_seconds": 20.0, "post_seconds": 3.0},
                      update={"norm": 2.0, "relative": 0.0123, "unwritten": 0.25})
        case.write_text(json.dumps(record))
    summary = summarize_run(run)
    assert summary.target_seconds == 20.0
    for path in run.iterdir():
        path.unlink()
    rebuilt = RunSummary.from_record(json.loads(json.dumps(summary.to_record())))
    assert rebuilt == summary
    assert format_comparison([rebuilt]) == format_comparison([summary]) and format_table(rebuilt) == format_table(summary)


def test_cases_edited_at_a_merged_subject_token_are_counted(tmp_path):
    run = _make_run(tmp_path / "run_000", 2, [(_cf(0.0, 0.0, 0.9), _cf(1.0, 1.0, 0.9))] * 2)
    assert summarize_run(run).to_json()["merged_subject_cases"] is None  # recorded before they were counted
    assert "merged_subject_cases" not in format_table(summarize_run(run))
    params = json.loads((run / "params.json").read_text())
    (run / "params.json").write_text(json.dumps({**params, "skipped_case_ids": [], "merged_subject_case_ids": [1]}))
    summary = summarize_run(run)
    assert summary.to_json()["merged_subject_cases"] == 1
    assert " merged_subject_cases=1" in format_table(summary).splitlines()[0]
    assert RunSummary.from_record(summary.to_record()).merged_subject_cases == 1
