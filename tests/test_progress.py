"""Progress of long steps when the output is not a terminal: periodic log lines, no bar text."""
from __future__ import annotations

import logging
import time

import pytest

from memit.utils.progress import ENV_INTERVAL, progress

from .conftest import COUNTERFACT, random_llama


def _slow(items, seconds=0.02):
    for item in items:
        time.sleep(seconds)
        yield item


def test_a_slow_loop_logs_counts_and_time_left_and_no_bar(caplog, capsys):
    items = [object() for _ in range(5)]
    with caplog.at_level(logging.INFO, logger="tests.progress"):
        got = list(progress(_slow(items), total=5, desc="scoring", unit="cases", logger="tests.progress", interval=0.01))
    assert got == items  # every item, unchanged
    lines = [r.getMessage() for r in caplog.records if r.name == "tests.progress"]
    assert lines and all(r.levelno == logging.INFO for r in caplog.records)
    assert any(line.startswith("scoring: ") and "/5 cases (" in line and "elapsed, about" in line and "left" in line
               for line in lines), lines
    assert lines[-1].startswith("scoring: 5/5 cases (100%)") and lines[-1].endswith("done")
    captured = capsys.readouterr()
    assert "scoring" not in captured.err and "|" not in captured.err and "it/s" not in captured.err


def test_manual_updates_and_the_interval_from_the_environment(caplog, capsys, monkeypatch):
    monkeypatch.setenv(ENV_INTERVAL, "0.01")
    with caplog.at_level(logging.INFO):
        with progress(total=3, desc="key statistics", unit="samples", interval=3600) as bar:
            for _ in range(3):
                time.sleep(0.02)
                bar.update(1)
    # The calling module's logger by default.
    records = [r for r in caplog.records if r.name == __name__]
    assert any("1/3 samples (33%)" in r.getMessage() and "left" in r.getMessage() for r in records)
    assert records[-1].getMessage().endswith("done")
    assert capsys.readouterr().err == ""


def test_a_short_step_logs_nothing(caplog, monkeypatch):
    monkeypatch.delenv(ENV_INTERVAL, raising=False)
    with caplog.at_level(logging.INFO):
        assert list(progress(range(3), desc="quick", unit="cases", interval=60)) == [0, 1, 2]
    assert not caplog.records


@pytest.fixture(scope="module")
def tiny_model(default_model):
    tok = default_model[1]
    return random_llama(tok, num_layers=2, seed=1234, head_scale=1.0, max_position_embeddings=512), tok


def test_an_evaluation_run_logs_the_progress_of_its_scoring(tiny_model, tmp_path, caplog, monkeypatch):
    from memit.editing.ft.hparams import FTHyperParams
    from memit.evaluation.runner import RunConfig, run_evaluation

    model, tok = tiny_model
    monkeypatch.setenv(ENV_INTERVAL, "0")
    config = RunConfig(alg="FT", dataset="cf", data_file=str(COUNTERFACT), data_dir=str(tmp_path / "data"), num_edits=2,
                       limit=2, out=str(tmp_path), generation_tokens=2)
    hparams = FTHyperParams(layers=[1], num_steps=2, lr=1e-3)
    with caplog.at_level(logging.INFO, logger="memit"):
        run_dir = run_evaluation(config, model, tok, hparams)
    assert len(list(run_dir.glob("case_*.json"))) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "memit.evaluation.runner"]
    for step in ("unedited scoring", "post-edit scoring"):
        assert any(line.startswith(f"{step}: 1/2 cases (50%)") and line.endswith("left") for line in lines), lines
        assert f"{step}: 2/2 cases (100%)" in "\n".join(lines)
    assert any(line.startswith(f"evaluate {run_dir.name}: 1/1 groups (100%)") for line in lines), lines


def test_a_large_memit_edit_logs_its_layers_and_key_batches(tiny_model, tmp_path, caplog, monkeypatch):
    # At thousands of edits, writing the layers (keys of every request under every context
    # template) takes many minutes after the target vectors: it must not be silent.
    from memit import MEMITHyperParams, edit_model

    model, tok = tiny_model
    monkeypatch.setenv(ENV_INTERVAL, "0")
    requests = [{"prompt": "{} plays the sport of", "subject": f"Player number {i}", "target_new": "football"} for i in range(100)]
    hparams = MEMITHyperParams(layers=[0, 1], v_num_grad_steps=1, v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625,
                               context_template_length_params=[[5, 10]], mom2_n_samples=20,
                               mom2_max_tokens=64, mom2_dataset="wikipedia-sample")
    with caplog.at_level(logging.INFO, logger="memit"):
        edit_model(model, tok, requests, hparams, stats_dir=str(tmp_path)).revert(model)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("memit.editing")]
    assert any(line.startswith("writing layers: 1/2 layers (50%)") for line in lines), lines
    # 100 requests x 11 templates = 1,100 prompts in batches of 64.
    assert any(line.startswith("keys: 9/18 batches") for line in lines), lines
