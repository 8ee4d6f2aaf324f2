"""The command line, run in-process on the real default model."""
import json

from click.testing import CliRunner

from memit import WeightDeltas
from memit.cli import main
from memit.models import load_model
from memit.predict import top_next_tokens


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
    assert (entry["pre"]["says_target_new"], entry["post"]["says_target_new"]) == (False, True)
    assert f"says: {entry['post']['says']!r}" in result.output
    assert WeightDeltas.load(saved).manifest["requests"][0]["subject"] == "LeBron James"

    # A second edit on top of the saved one: the saved model knows both new facts.
    requests.write_text(json.dumps([
        {"prompt": "{} plays the sport of", "subject": "Michael Jordan", "target_new": {"str": "baseball"}},
    ]))
    result = CliRunner().invoke(main, [
        "edit", "--requests", str(requests), "--hparams", str(hparams), "--on-top-of", str(saved), "--save", str(tmp_path / "model"),
    ])
    assert result.exit_code == 0, result.output
    model, tok = load_model(str(tmp_path / "model"))
    for subject, sport in [("LeBron James", " football"), ("Michael Jordan", " baseball")]:
        assert top_next_tokens(model, tok, f"{subject} plays the sport of", k=1)[0][0] == sport, subject


def test_bad_requests_file_is_a_clear_error(tmp_path):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "no placeholder", "subject": "x", "target_new": "y"}]))
    result = CliRunner().invoke(main, ["edit", "--requests", str(requests)])
    assert result.exit_code == 1
    assert "request 0: field 'prompt' must contain exactly one '{}'" in result.output
    requests.write_text("not json")
    result = CliRunner().invoke(main, ["edit", "--requests", str(requests)])
    assert result.exit_code == 1 and "is not valid JSON" in result.output


def test_a_named_corpus_that_cannot_load_is_a_one_line_error_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}]))
    result = CliRunner().invoke(main, ["edit", "--requests", str(requests), "--corpus", str(tmp_path / "nowhere.jsonl.gz")])
    assert result.exit_code == 1 and "Error: corpus: file" in result.output and "nowhere.jsonl.gz does not exist" in result.output

    # An internal error is not a user error: it reaches the caller with its type and traceback.
    def broken(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr("memit.api.edit_model", broken)
    result = CliRunner().invoke(main, ["edit", "--requests", str(requests)])
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
