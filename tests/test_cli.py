"""The command line, run in-process on the real default model."""
import json

from click.testing import CliRunner

from memit import WeightDeltas
from memit.cli import main


def test_edit_reports_before_and_after_and_saves_deltas(tmp_path, default_hparams):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([
        {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}, "target_true": {"str": "basketball"}},
    ]))
    hparams = tmp_path / "hparams.json"
    default_hparams.save(hparams)
    report, saved = tmp_path / "report.json", tmp_path / "edit"
    result = CliRunner().invoke(main, [
        "edit", "--requests", str(requests), "--hparams", str(hparams),
        "--report", str(report), "--save", str(saved), "--deltas-only",
    ])
    assert result.exit_code == 0, result.output
    assert "'LeBron James plays the sport of'" in result.output and "after" in result.output
    (entry,) = json.loads(report.read_text())
    assert entry["post"]["target_new_prob"] > 0.3 > entry["pre"]["target_new_prob"]
    assert entry["post"]["target_true_prob"] < entry["pre"]["target_true_prob"]
    assert [t["token"] for t in entry["post"]["top_tokens"]][0] == " football"
    assert WeightDeltas.load(saved).manifest["requests"][0]["subject"] == "LeBron James"


def test_bad_requests_file_is_a_clear_error(tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "no placeholder", "subject": "x", "target_new": "y"}]))
    result = CliRunner().invoke(main, ["edit", "--requests", str(requests)])
    assert result.exit_code == 1
    assert "request 0: field 'prompt' must contain exactly one '{}'" in result.output
    requests.write_text("not json")
    result = CliRunner().invoke(main, ["edit", "--requests", str(requests)])
    assert result.exit_code == 1 and "is not valid JSON" in result.output
