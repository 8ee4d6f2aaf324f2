"""Work split across 2 gloo processes on 127.0.0.1 gives the numbers of 1 process: key
statistics, target vectors, and an evaluation run's scoring (one run folder)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from memit import EditOptions, ModelLayout
from memit.editing.common import context_templates
from memit.editing.targets import compute_targets
from memit.evaluation.runner import RunConfig, run_evaluation
from memit.requests import parse_requests
from memit.stats import collect_second_moments, load_corpus
from tests.conftest import COUNTERFACT, TEST_STATS_SAMPLES

REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": "English"}},
    {"prompt": "{} is located in the continent of", "subject": "Mount Kenya", "target_new": {"str": "Europe"}},
]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def counting_tokens(model):
    """Counts the tokens ``model`` embeds while the context is open: the work a process did."""
    seen = [0]
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: seen.__setitem__(0, seen[0] + args[0].numel()))
    try:
        yield seen
    finally:
        handle.remove()


def _hparams():
    from memit import MEMITHyperParams

    hp = MEMITHyperParams.preset("SmolLM2-135M-Instruct")
    return dataclasses.replace(hp, mom2_n_samples=TEST_STATS_SAMPLES, v_num_grad_steps=6)


def part_statistics(model, tok, out):
    moments, count = collect_second_moments(model, tok, ModelLayout.from_model(model), [3, 6], load_corpus("wikipedia-sample").texts(), 25, 64)
    return {"moments": moments, "count": count}


def part_targets(model, tok, out):
    hp = _hparams()
    layout = ModelLayout.from_model(model)
    vectors = compute_targets(model, tok, layout, parse_requests(REQUESTS), hp, context_templates(model, tok, hp, EditOptions()),
                              hp.layers[-1], batch_size=1)
    return {"delta": vectors.delta}


def part_edit(model, tok, out):
    from memit.editing.methods import get_editor_class

    edit = get_editor_class("MEMIT")(_hparams(), EditOptions()).edit(model, tok, REQUESTS)
    edit.revert(model)
    return {"deltas": dict(edit.deltas)}


def part_scoring(model, tok, out):
    config = RunConfig(data_file=str(COUNTERFACT), limit=5, num_edits=5, skip_generation=True, out=str(out))
    run_dir = run_evaluation(config, model, tok, _hparams(), EditOptions(batch_size=2))
    return {"run_dir": str(run_dir)}


def part_sequential(model, tok, out):
    """A sequential run started in a fresh folder, the second process arriving only once the
    first has made its run folder (or after 10 s): both must still work in that one folder."""
    from memit.evaluation.scaling import run_sequential

    if dist.get_rank() == 1:
        deadline = time.monotonic() + 10
        while not (out / "MEMIT").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    config = RunConfig(data_file=str(COUNTERFACT), skip_generation=True, out=str(out))
    [summary] = run_sequential(config, 2, [2], model, tok, _hparams(), EditOptions(batch_size=2))
    return {"run_dir": str(summary.run_dir)}


def part_conversion(model, tok, out):
    from memit.models.loading import model_fingerprint

    return {"fingerprint": model_fingerprint(model)}


def part_sharding(model, tok, out):
    from memit.utils.distributed import shard

    return {"share": shard(list(range(20)), heavy=lambda i: i % 10 == 0)}


PARTS = {
    "sharding": part_sharding, "statistics": part_statistics, "targets": part_targets, "scoring": part_scoring, "edit": part_edit,
    "conversion": part_conversion, "sequential": part_sequential,
}


def _worker(rank: int, part: str, port: int, out: str) -> None:
    from memit import load_model

    torch.set_num_threads(1)
    if part == "conversion":  # a machine where the default model was never converted
        os.environ["MEMIT_HOME"] = os.path.join(out, "home")
    # A process left waiting on another fails the test in minutes instead of hanging it.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(minutes=3))
    try:
        model, tok = load_model("default")
        with counting_tokens(model) as tokens:
            result = PARTS[part](model, tok, Path(out))
        result["tokens"] = tokens[0]
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(part: str, out) -> list[dict]:
    mp.spawn(_worker, args=(part, _free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_ranks_on_a_fresh_machine_convert_the_default_model_once(default_model, tmp_path):
    """transformers saves a model only from rank 0, so rank 0 converts and the others wait."""
    from memit.models.loading import model_fingerprint

    ranks = run_distributed("conversion", tmp_path)
    assert [r["fingerprint"] for r in ranks] == [model_fingerprint(default_model[0])] * WORLD
    assert [p.name for p in (tmp_path / "home" / "models").iterdir()] == ["SmolLM2-135M-Instruct"]


def test_statistics_split_across_processes_equal_one_process(default_model, tmp_path):
    model, tok = default_model
    ranks = run_distributed("statistics", tmp_path)
    with counting_tokens(model) as tokens:
        alone = part_statistics(model, tok, tmp_path)
    # Each process read part of the corpus, and together the whole of it.
    assert all(0 < r["tokens"] < 0.7 * tokens[0] for r in ranks) and sum(r["tokens"] for r in ranks) >= tokens[0]
    for result in ranks:
        assert result["count"] == alone["count"] > 0
        for layer in (3, 6):
            torch.testing.assert_close(result["moments"][layer], alone["moments"][layer], atol=1e-6, rtol=1e-5)


def test_target_vectors_split_across_processes_equal_one_process(default_model, tmp_path):
    model, tok = default_model
    ranks = run_distributed("targets", tmp_path)
    with counting_tokens(model) as tokens:
        alone = part_targets(model, tok, tmp_path)["delta"]
    # Three requests over two processes: each optimised its share, not all of them.
    assert all(0 < r["tokens"] < 0.8 * tokens[0] for r in ranks)
    for result in ranks:
        assert float((result["delta"] - alone).norm() / alone.norm()) < 1e-4


def test_an_edit_whose_keys_are_split_across_processes_equals_one_process(default_model, tmp_path):
    """Each process computes the keys and current outputs of its share of the requests."""
    model, tok = default_model
    ranks = run_distributed("edit", tmp_path)
    alone = part_edit(model, tok, tmp_path)["deltas"]
    for result in ranks:
        assert result["deltas"].keys() == alone.keys()
        for name, delta in alone.items():
            assert float((result["deltas"][name] - delta).norm() / delta.norm()) < 1e-3, name


def test_scoring_split_across_processes_fills_one_run_folder_with_the_same_numbers(default_model, tmp_path):
    model, tok = default_model
    ranks = run_distributed("scoring", tmp_path / "split")
    assert ranks[0]["run_dir"] == ranks[1]["run_dir"]
    split = sorted((tmp_path / "split" / "MEMIT" / "run_000").glob("case_*.json"))
    alone_dir = part_scoring(model, tok, tmp_path / "alone")["run_dir"]
    alone = sorted((tmp_path / "alone" / "MEMIT" / "run_000").glob("case_*.json"))
    assert len(split) == len(alone) == 5 and str(alone[0].parent) == alone_dir
    for a, b in zip(split, alone):
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        for phase in ("pre", "post"):
            for key in ("efficacy_success", "paraphrase_success", "neighborhood_success"):
                assert ra[phase][key] == rb[phase][key], (a.name, phase, key)
            assert ra[phase]["efficacy_magnitude"] == pytest.approx(rb[phase]["efficacy_magnitude"], abs=1e-3)


def test_processes_starting_a_sequential_run_at_different_times_share_one_run_folder(default_model, tmp_path):
    ranks = run_distributed("sequential", tmp_path)
    assert ranks[0]["run_dir"] == ranks[1]["run_dir"] == str(tmp_path / "MEMIT" / "run_000")
    assert [p.name for p in (tmp_path / "MEMIT").iterdir() if p.name.startswith("run_")] == ["run_000"]
    assert len(list((tmp_path / "MEMIT" / "run_000").glob("case_*.json"))) == 4


def test_heavy_items_are_dealt_out_evenly_across_processes(tmp_path):
    """Fluency on every 10th case in 2 processes: dealt out with the rest, every such case
    would go to rank 0."""
    shares = [r["share"] for r in run_distributed("sharding", tmp_path)]
    assert [[i for i in share if i % 10 == 0] for share in shares] == [[0], [10]]
    assert sorted(shares[0] + shares[1]) == list(range(20)) and len(shares[0]) == len(shares[1])


def test_more_processes_than_cuda_devices_is_a_clear_error():
    from memit.errors import InputError
    from memit.utils.distributed import process_cuda_device

    assert process_cuda_device(1, 2) == 1
    with pytest.raises(InputError, match="nproc-per-node.*at most 1"):
        process_cuda_device(1, 1)
