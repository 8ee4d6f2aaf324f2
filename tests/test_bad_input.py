"""Damaged and hostile input: each command answers a user's mistake with one line naming the
input and a non-zero exit, never a traceback, and files built from data stay in their folder."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from memit.cli import main
from memit.errors import InputError

BAD_KINDS = ("missing", "folder", "not_utf8", "wrong_shape")


def _bad_file(tmp_path: Path, kind: str, wrong_shape: object) -> Path:
    path = tmp_path / f"input_{kind}.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "not_utf8":
        path.write_bytes(b'[{"prompt": "\xff\xfe caf\xe9"}]')
    elif kind == "wrong_shape":
        path.write_text(json.dumps(wrong_shape))
    return path


def _run_folder_with(tmp_path: Path, kind: str) -> Path:
    """A run folder for `summarize` whose case file is the bad input (or which is itself)."""
    run = tmp_path / "run_000"
    if kind == "missing":
        return run
    if kind == "folder":
        run.mkdir()
        (run / "params.json").mkdir()
        return run
    run.mkdir()
    (run / "params.json").write_text(json.dumps({"config": {}, "hparams": {}}))
    case = run / "case_0.json"
    case.write_bytes(b"{\"case_id\": \"\xff\"}") if kind == "not_utf8" else case.write_text(json.dumps([1, 2, 3]))
    return run


# command -> (arguments around the bad file, the JSON of a wrong shape for it)
COMMANDS = {
    "edit": (lambda f: ["edit", "--requests", str(f)], {"prompt": 1}),
    "edit --hparams": (lambda f: ["edit", "--requests", str(REQUESTS), "--hparams", str(f)], ["layers"]),
    "evaluate": (lambda f: ["evaluate", "--data-file", str(f), "--limit", "2", "--skip-generation"], {"not": "a list"}),
    "scale": (lambda f: ["scale", "--data-file", str(f), "--num-edits", "1", "--skip-generation"], [1, 2]),
    "trace": (lambda f: ["trace", "--data-file", str(f), "--limit", "1"], [{"known_id": 1}]),
    "tune": (lambda f: ["tune", "--data-file", str(f), "--out", str(f.parent / "preset.json"), "--budget-minutes", "0.01"], 7),
    "demo": (lambda f: ["demo", "--corpus", str(f)], None),
}
REQUESTS = Path(__file__).parent / "data" / "one_request.json"


def _assert_one_line_error(result, *names: str) -> None:
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, result.output
    assert any(name in error_lines[0] for name in names), result.output


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_input_file_is_one_line_naming_it(tmp_path, command, kind):
    args, wrong_shape = COMMANDS[command]
    if command == "demo" and kind == "wrong_shape":
        path = tmp_path / "corpus.jsonl"
        path.write_text(json.dumps([1, 2]) + "\n")
    else:
        path = _bad_file(tmp_path, kind, wrong_shape)
    outputs = {"evaluate": "--out", "scale": "--out", "trace": "--out", "tune": "--work-dir"}
    extra = [outputs[command], str(tmp_path / "out")] if command in outputs else []
    result = CliRunner().invoke(main, [*args(path), *extra])
    _assert_one_line_error(result, path.name, str(path))


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_summarize_of_a_bad_run_folder_is_one_line_naming_it(tmp_path, kind):
    run = _run_folder_with(tmp_path, kind)
    result = CliRunner().invoke(main, ["summarize", str(run)])
    _assert_one_line_error(result, run.name)


def test_a_model_path_that_does_not_exist_is_one_line(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    result = CliRunner().invoke(main, ["edit", "--requests", str(REQUESTS), "--model", str(missing)])
    _assert_one_line_error(result, str(missing))


# --- names built from data stay inside their folder ---------------------------------------------

HOSTILE_IDS = ["../../escaped", "/etc/passwd", "..", ".", "", "a\x00b", "x" * 500, "ñandú/../日本", "C:\\windows\\x", "case 1"]


def test_every_hostile_id_becomes_one_distinct_component_inside_its_folder(tmp_path):
    from memit.utils.paths import child_path, path_component

    names = [path_component(value) for value in HOSTILE_IDS]
    assert len(set(names)) == len(names)
    for value, name in zip(HOSTILE_IDS, names):
        assert "/" not in name and "\\" not in name and "\x00" not in name and name not in ("", ".", "..")
        assert len(name.encode()) <= 100, value
        assert child_path(tmp_path, name).parent == tmp_path
    assert [path_component(v) for v in (7, "1234", "run_003", "t.json")] == ["7", "1234", "run_003", "t.json"]
    with pytest.raises(InputError, match="leaves its folder"):
        child_path(tmp_path, "../outside")


def test_runner_and_tracing_paths_from_hostile_ids_stay_in_their_folders(tmp_path):
    from memit.evaluation.datasets.counterfact import CounterFactCase
    from memit.evaluation.edit_cache import deltas_dir
    from memit.evaluation.run_folders import case_file, run_root
    from memit.tracing.run import Known, trace_file

    run_dir = tmp_path / "out" / "MEMIT" / "run_000"
    for value in HOSTILE_IDS:
        case = CounterFactCase.__new__(CounterFactCase)
        object.__setattr__(case, "case_id", value)
        assert case_file(run_dir, case).parent == run_dir
        assert deltas_dir(run_dir, [case]).parent == run_dir / ".deltas"
        assert trace_file(tmp_path, Known(value, "s", "{} p", "a"), "mlp").parent == tmp_path / "traces"
        assert run_root(tmp_path, value).parent == tmp_path


def test_an_evaluation_of_cases_with_hostile_ids_writes_only_inside_its_run(default_model, default_hparams, tmp_path):
    import dataclasses

    from memit.evaluation.runner import RunConfig, run_evaluation
    from memit.evaluation.summary import summarize_run

    from .conftest import DATA_DIR

    records = json.loads((DATA_DIR / "counterfact_mend" / "counterfact-val.json").read_text())[:3]
    ids = ["../../escaped", "/tmp/absolute", "ñandú\x00" + "x" * 300]
    for record, case_id in zip(records, ids):
        record["case_id"] = case_id
    data = tmp_path / "data" / "hostile.json"
    data.parent.mkdir()
    data.write_text(json.dumps(records))
    out = tmp_path / "deep" / "out"
    config = RunConfig(dataset="cf-mend", data_file=str(data), num_edits=1, sequential_batches=1, out=str(out),
                       skip_generation=True, generated_answers=False)
    run_dir = run_evaluation(config, *default_model, dataclasses.replace(default_hparams, v_num_grad_steps=2))
    written = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert all(out in p.parents or p == data for p in written), sorted(written)
    assert not Path("/tmp/absolute.json").exists()
    assert sorted(json.loads(p.read_text())["case_id"] for p in run_dir.glob("case_*.json")) == sorted(ids)
    assert summarize_run(run_dir).num_cases == 3


# --- processes started at once ------------------------------------------------------------------

def test_evaluations_started_at_once_get_their_own_run_folders(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    from memit.evaluation.run_folders import new_run_dir

    with ProcessPoolExecutor(4) as pool:
        folders = list(pool.map(new_run_dir, [tmp_path] * 8, ["MEMIT"] * 8))
    assert len(set(folders)) == 8 and all(Path(f).is_dir() for f in folders)


STATS_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from memit.models.layout import ModelLayout
from memit.stats import SecondMomentCache, load_corpus
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
moments = SecondMomentCache(sys.argv[2]).get(model, tok, ModelLayout.from_model(model), [0, 1], load_corpus(sys.argv[3]), 200, 64)
torch.save({k: v for k, v in moments.items()}, sys.argv[4])
"""


def test_two_processes_computing_the_same_statistics_leave_one_good_file(default_model, tmp_path):
    import subprocess
    import sys

    import torch

    from .conftest import SHARED_CORPUS, random_llama

    tok = default_model[1]
    random_llama(tok, num_layers=2, seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    stats = tmp_path / "stats"
    procs = [subprocess.Popen([sys.executable, "-c", STATS_SCRIPT, str(tmp_path / "model"), str(stats), str(SHARED_CORPUS),
                               str(tmp_path / f"result{i}.pt")]) for i in range(2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    first, second = (torch.load(tmp_path / f"result{i}.pt", weights_only=True) for i in range(2))
    assert all(torch.equal(first[k], second[k]) for k in first)
    files = sorted(p.name for p in stats.rglob("*") if p.is_file())
    assert len(files) == 2 and all(name.endswith(".safetensors") and not name.startswith(".") for name in files), files


# --- saved edits are checked before they touch a model -----------------------------------------

@pytest.fixture()
def tiny(default_model):
    from .conftest import random_llama

    return random_llama(default_model[1], num_layers=2, seed=1)


def _deltas_for(model, seed: int = 0):
    import torch

    from memit.deltas import WeightDeltas
    from memit.models.loading import model_fingerprint

    generator = torch.Generator().manual_seed(seed)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    deltas = {n: torch.randn(params[n].shape, generator=generator) * 0.01 for n in names}
    return WeightDeltas(deltas, {"algorithm": "MEMIT", "model_fingerprint": model_fingerprint(model)})


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_damaged_or_replaced_deltas_files_are_refused_naming_the_file(tiny, tmp_path):
    from memit.deltas import WEIGHTS_FILE, WeightDeltas

    _deltas_for(tiny).save(tmp_path / "d")
    weights = tmp_path / "d" / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputError, match="SHA-256 its manifest records") as err:
        WeightDeltas.load(tmp_path / "d")
    assert str(weights) in str(err.value)
    # Without a recorded checksum (deltas saved before it was recorded) the format is still checked.
    manifest = json.loads((tmp_path / "d" / "edit_config.json").read_text())
    del manifest["deltas_sha256"]
    (tmp_path / "d" / "edit_config.json").write_text(json.dumps(manifest))
    import pickle

    for damaged in (good[: len(good) // 2], pickle.dumps({"weight": [1.0, 2.0]})):
        weights.write_bytes(damaged)
        with pytest.raises(InputError, match="not a readable safetensors file") as err:
            WeightDeltas.load(tmp_path / "d")
        assert str(weights) in str(err.value)


def test_deltas_for_another_model_are_refused_unless_forced(tiny, default_model, tmp_path, caplog):
    from memit.errors import InputError

    from .conftest import random_llama

    other = random_llama(default_model[1], num_layers=2, seed=2)  # same shapes, other weights and fingerprint
    deltas = _deltas_for(tiny)
    before = _weights(other)
    with pytest.raises(InputError, match="made for model"):
        deltas.apply(other)
    assert _same(before, _weights(other))
    with caplog.at_level("WARNING"):
        deltas.apply(other, force=True)
    assert "as forced" in caplog.text and not _same(before, _weights(other))
    deltas.revert(other)
    assert _same(before, _weights(other))


def test_deltas_that_do_not_fit_change_no_weight(tiny):
    import torch

    from memit.errors import InputError

    deltas = _deltas_for(tiny)
    deltas.deltas["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
    before = _weights(tiny)
    with pytest.raises(InputError, match="has shape"):
        deltas.apply(tiny)
    deltas.deltas["model.layers.1.mlp.down_proj.weight"] = torch.zeros_like(before["model.layers.1.mlp.down_proj.weight"], dtype=torch.int64)
    with pytest.raises(InputError, match="not a floating-point type"):
        deltas.apply(tiny)
    assert _same(before, _weights(tiny))


def test_reverting_out_of_order_is_refused_and_newest_first_is_exact(tiny):
    from memit.errors import InputError

    before = _weights(tiny)
    first = _deltas_for(tiny, seed=0).apply(tiny)
    middle = _weights(tiny)
    second = _deltas_for(tiny, seed=1).apply(tiny)
    with pytest.raises(InputError, match="revert them first"):
        first.revert(tiny)
    second.revert(tiny)
    assert _same(middle, _weights(tiny))
    first.revert(tiny)
    assert _same(before, _weights(tiny))


def test_on_top_of_deltas_of_another_model_is_one_line(default_model, tmp_path):
    deltas = _deltas_for(default_model[0])
    deltas.manifest["model_fingerprint"] = "0123456789abcdef"
    deltas.save(tmp_path / "foreign")
    result = CliRunner().invoke(main, ["edit", "--requests", str(REQUESTS), "--on-top-of", str(tmp_path / "foreign")])
    _assert_one_line_error(result, "made for model 0123456789abcdef")


def test_a_folder_written_atomically_is_all_or_nothing(tmp_path):
    from memit.utils.io import atomic_dir

    target = tmp_path / "saved"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as folder:
            (folder / "half.bin").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as folder:
        (folder / "one").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as folder:
            (folder / "two").write_text("2")
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["saved"] and [p.name for p in target.iterdir()] == ["one"]
    with atomic_dir(target) as folder:
        (folder / "three").write_text("3")
    assert [p.name for p in target.iterdir()] == ["three"] and [p.name for p in tmp_path.iterdir()] == ["saved"]


def test_statistics_of_a_corpus_with_a_hostile_name_stay_in_the_cache(tiny, tmp_path):
    from memit.stats import SecondMomentCache
    from memit.stats.corpus import Corpus

    cache = SecondMomentCache(tmp_path / "stats")
    for name in HOSTILE_IDS:
        folder = cache._folder(tiny, Corpus(name, lambda: iter(())))
        assert folder.parent.parent == tmp_path / "stats"
