"""The real-size benchmark (benchmarks/scale_gpu.py) at its tiny shape on the CPU: the same
code path the GPU run takes, so that the device run cannot fail on a typo."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from memit import ModelLayout

from .conftest import COUNTERFACT, REPO, random_llama

SCRIPT = REPO / "benchmarks" / "scale_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scale_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_gpu"] = module  # its dataclasses look their module up
    sys.path.insert(0, str(SCRIPT.parent))  # it reads benchmarks/memory.py, as it does when run as a script
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "tiny.json"
    args = ["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--requests", "6", "--stats-samples", "12",
            "--batch-sizes", "2", "--batch-size", "3", "--steps", "2", "--cases", "2", "--counterfact", str(COUNTERFACT),
            "--out", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), json.loads(out.read_text()), proc.stdout


def test_every_phase_reports_time_throughput_memory_and_its_flop_limit(tiny_run):
    summary, written, stdout = tiny_run
    assert written == summary
    rows = {r["phase"]: r for r in summary["phases"]}
    assert list(rows) == ["stats", "targets_bs2", "targets", "edit", "scoring"]
    assert rows["stats"]["tokens"] > 12 and rows["stats"]["tokens_per_s"] > 0
    assert rows["targets"]["requests"] == 6 and rows["targets"]["batch_size"] == 3
    assert rows["targets_bs2"]["requests"] == 4
    assert rows["edit"]["requests_per_s"] > 0 and rows["scoring"]["cases"] == 2
    assert set(rows["edit"]["solve_s"]) == set(rows["edit"]["keys_s"]) == {str(layer) for layer in summary["layers"]}
    for row in rows.values():
        assert row["seconds"] > 0 and row["peak_memory_gib"] > 0
        # Far beyond the device's own matmul rate would mean miscounted FLOPs; the rate is measured
        # beside whatever else runs on the machine, so only the order of magnitude is checked.
        assert 0 < row["of_limit"] < 10, row
    for name in ("stats", "targets", "edit"):
        assert rows[name]["predicted_memory_gib"] > 0
    assert summary["end_to_end_s"] == pytest.approx(sum(rows[p]["seconds"] for p in ("stats", "targets", "edit")))
    assert summary["matmul_flops"] > 0 and summary["float64_flops"] > 0
    assert "| edit |" in stdout


def test_the_edit_reads_its_target_vectors_from_the_cache(tiny_run):
    rows = {r["phase"]: r for r in tiny_run[0]["phases"]}
    # The edit computes keys and solves only: its forward work is far below the targets' optimisation.
    assert rows["edit"]["limit_s"] < rows["targets"]["limit_s"]


def test_the_shapes_are_the_real_configurations(bench):
    model = bench.build_model("llama3-8b", 128, 0, "meta", torch.bfloat16)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_key_value_heads) == (32, 4096, 14336, 8)
    mlp = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    assert mlp == 3 * 4096 * 14336
    gptj = bench.build_model("gptj-6b", 128, 0, "meta", torch.bfloat16)
    assert (gptj.config.n_layer, gptj.config.n_embd, gptj.config.n_inner) == (28, 4096, 16384)


def test_a_moved_parameter_or_stray_delta_is_caught(bench, default_model):
    tok = default_model[1]
    model = bench.build_model("tiny", len(tok), tok.pad_token_id, "cpu", torch.float32)
    placement = {n: (p.device, p.dtype) for n, p in model.named_parameters()}
    bench.check_placement(model, placement)
    name = ModelLayout.from_model(model).weight_name(0)
    with pytest.raises(RuntimeError, match="deltas away"):
        bench.check_placement(model, placement, {name: torch.zeros(1, device="meta")})
    model.get_parameter(name).data = model.get_parameter(name).data.double()
    with pytest.raises(RuntimeError, match=name):
        bench.check_placement(model, placement)


def test_the_flop_counter_counts_every_layer_and_the_head(bench, default_model):
    tok = default_model[1]
    model = bench.build_model("tiny", len(tok), tok.pad_token_id, "cpu", torch.float32)
    layout = ModelLayout.from_model(model)
    sizes = bench.Sizes.of(model, layout, 0)
    counter = bench.FlopCounter(model, layout, sizes)
    with torch.no_grad():
        model(torch.ones(3, 5, dtype=torch.long))
    counter.remove()
    assert counter.tokens == [15, 15] and counter.head_tokens == 15
    per_layer = 2 * sizes.layer_params * 15 + 2 * 3 * 25 * sizes.hidden
    assert counter.forward_flops() == per_layer * 2 + 2 * sizes.vocab * sizes.hidden * 15
    assert counter.forward_flops(1) == per_layer + 2 * sizes.vocab * sizes.hidden * 15


REFERENCE = REPO / "benchmarks" / "scale_gpu_reference.py"
REFERENCE_SRC, REFERENCE_SITE = os.environ.get("MEMIT_REFERENCE_SRC"), os.environ.get("MEMIT_REFERENCE_SITE")


@pytest.mark.skipif(not (REFERENCE_SRC and REFERENCE_SITE),
                    reason="the paper's code: MEMIT_REFERENCE_SRC (a checkout of kmeng01/memit) and MEMIT_REFERENCE_SITE "
                           "(transformers 4.46, tokenizers 0.20, huggingface_hub 0.26, nltk installed with pip --target)")
def test_the_papers_code_runs_the_same_phases_beside_memit(tiny_run, default_model, tmp_path):
    default_model[1].save_pretrained(tmp_path / "tokenizer")
    out = tmp_path / "reference.json"
    memit_json = tmp_path / "memit.json"
    memit_json.write_text(json.dumps(tiny_run[0]))
    args = ["--src", REFERENCE_SRC, "--tokenizer", str(tmp_path / "tokenizer"), "--shape", "tiny", "--device", "cpu",
            "--dtype", "float32", "--requests", "3", "--stats-samples", "12", "--steps", "2", "--cases", "2",
            "--counterfact", str(COUNTERFACT), "--memit", str(memit_json), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": REFERENCE_SITE}
    proc = subprocess.run([sys.executable, str(REFERENCE), *args], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    rows = {r["phase"]: r for r in summary["phases"]}
    assert list(rows) == ["stats", "targets", "edit", "scoring"]
    assert rows["stats"]["passes"] == len(summary["layers"]) == 2  # the paper's code: one corpus pass per layer
    assert rows["targets"]["requests"] == rows["edit"]["requests"] == 3 and rows["scoring"]["cases"] == 2
    for row in rows.values():
        assert row["seconds"] > 0 and row["peak_memory_gib"] > 0
    table = proc.stdout.split("seconds per unit\n", 1)[1]
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:6]] == ["stats", "targets", "edit", "scoring"]


@pytest.fixture(scope="module")
def reference_runner():
    """benchmarks/scale_gpu_reference.py as a module (its top level imports nothing of the paper's code)."""
    spec = importlib.util.spec_from_file_location("scale_gpu_reference_table", REFERENCE)
    sys.path.insert(0, str(REFERENCE.parent))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_of_different_shapes_are_not_compared(tiny_run, reference_runner):
    other = {**tiny_run[0], "shape": "llama3-8b"}
    with pytest.raises(SystemExit, match="another shape"):
        reference_runner.side_by_side(other, tiny_run[0])


@pytest.mark.parametrize("tied, head", [(False, "lm_head"), (True, "model.embed_tokens")])
def test_the_papers_code_is_given_the_module_that_holds_the_head_weight(reference_runner, tied, head):
    # The paper's code looks the head's weight up among the named parameters, where a tied
    # weight (Llama-3.2-1B's, the default model's) appears under the embedding only.
    model = random_llama(vocab_size=64, tie_word_embeddings=tied)
    assert reference_runner.head_module_name(model) == head
    assert f"{head}.weight" in dict(model.named_parameters())
