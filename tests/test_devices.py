"""Precision and placement: the default model loaded in bfloat16 and float16, a model with
layers offloaded to disk by an accelerate device map, and the command line's --device/--dtype."""
from __future__ import annotations

import dataclasses
import json
import logging
import platform

import pytest
import torch
from click.testing import CliRunner

from memit import edit_model, load_model
from memit.cli import main
from memit.errors import InputError
from memit.evaluation.runner import RunConfig, run_evaluation
from memit.models.layout import ModelLayout
from memit.predict import score_continuations
from memit.stats import collect_second_moments, load_corpus
from memit.utils import devices
from memit.utils.grad import bf16_autocast
from tests.conftest import COUNTERFACT

PROMPT = "LeBron James plays the sport of"
REQUEST = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football"}
# Layers 2-3 (below the edit layers 4-8, so statistics and keys pass through them) and 20-29 on disk.
OFFLOADED = [2, 3, *range(20, 30)]


@pytest.fixture(scope="module")
def small_stats_hparams(default_hparams):
    # Each precision has statistics of its own (its rounded weights): few samples, and fewer
    # optimisation steps, since half-precision backward passes are slow on a CPU.
    return dataclasses.replace(default_hparams, mom2_n_samples=100, v_num_grad_steps=12)


def _p_football(model, tok) -> float:
    return score_continuations(model, tok, [PROMPT], [" football"])[0].prob


def _weights(model) -> dict[str, torch.Tensor]:
    """Every parameter held on a device (offloaded ones live on the meta device)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.device.type != "meta"}


@pytest.fixture
def fresh_bfloat16_probe():
    """The probe and its once-per-process warning start afresh, and leave nothing a patched probe
    answered to later tests (also when the test fails)."""
    def clear():
        devices.cpu_lacks_bfloat16_units.cache_clear()
        devices.warn_if_cpu_bfloat16_is_slow.cache_clear()
    clear()
    yield clear
    clear()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_model_is_edited_and_reverted_bit_for_bit(dtype, small_stats_hparams, tmp_path, caplog, fresh_bfloat16_probe):
    with caplog.at_level(logging.WARNING, logger="memit.utils.devices"):
        model, tok = load_model("default", dtype=dtype, device="cpu")
    assert model.dtype == getattr(torch, dtype)
    slow = dtype == "bfloat16" and devices.cpu_lacks_bfloat16_units()
    assert any("A bfloat16 model (--dtype bfloat16) on a CPU without" in r.getMessage() for r in caplog.records) == slow
    before, p_before = _weights(model), _p_football(model, tok)
    deltas = edit_model(model, tok, [REQUEST], small_stats_hparams, stats_dir=str(tmp_path))
    p_after = _p_football(model, tok)
    assert p_before < 0.1 and p_after > 0.5, (p_before, p_after)
    # The deltas are kept in float32 (and added in the model's precision); no NaN or overflow.
    assert all(d.dtype == torch.float32 and bool(torch.isfinite(d).all()) for d in deltas.deltas.values())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    deltas.revert(model)
    assert all(torch.equal(v, w) for v, w in zip(before.values(), _weights(model).values()))


@pytest.fixture(scope="module")
def offloaded_model(tmp_path_factory):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" if i in OFFLOADED else "cpu" for i in range(30)}
    path = tmp_path_factory.mktemp("device_map") / "map.json"
    path.write_text(json.dumps(device_map))
    model, tok = load_model("default", device_map=str(path), offload_folder=str(tmp_path_factory.mktemp("offload")))
    assert model.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    return model, tok


def test_statistics_of_an_offloaded_model_equal_the_loaded_ones(offloaded_model, default_model):
    layout = ModelLayout.from_model(default_model[0])
    moments = [
        collect_second_moments(model, default_model[1], layout, [4, 5], load_corpus("wikipedia-sample").texts(), 8, 64)[0]
        for model in (offloaded_model[0], default_model[0])
    ]
    for layer in (4, 5):
        torch.testing.assert_close(moments[0][layer], moments[1][layer], rtol=0, atol=0)


def test_an_offloaded_model_is_edited_evaluated_and_reverted(offloaded_model, default_hparams, tmp_path):
    # The embeddings are not offloaded, so the model keeps its fingerprint and the session's statistics.
    model, tok = offloaded_model
    before = _weights(model)
    deltas = edit_model(model, tok, [REQUEST], default_hparams)
    assert _p_football(model, tok) > 0.5
    deltas.revert(model)
    assert all(torch.equal(v, w) for v, w in zip(before.values(), _weights(model).values()))

    config = RunConfig(data_file=str(COUNTERFACT), num_edits=2, limit=2, out=str(tmp_path), skip_generation=True)
    run_dir = run_evaluation(config, model, tok, default_hparams)
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("case_*.json"))]
    assert len(records) == 2
    assert sum(r["post"]["efficacy_success"] for r in records) > sum(r["pre"]["efficacy_success"] for r in records)
    assert all(torch.equal(v, w) for v, w in zip(before.values(), _weights(model).values()))


def test_an_offloaded_edit_layer_is_a_clear_error(offloaded_model, small_stats_hparams):
    model, tok = offloaded_model
    before = _weights(model)
    with pytest.raises(InputError, match=r"layers: layer 2 \(model.layers.2.mlp.down_proj.weight\) is offloaded"):
        edit_model(model, tok, [REQUEST], dataclasses.replace(small_stats_hparams, layers=[2, 3]))
    assert all(torch.equal(v, w) for v, w in zip(before.values(), _weights(model).values()))


def test_cli_edits_on_the_cpu_in_bfloat16(small_stats_hparams, tmp_path):
    requests, hparams, report = tmp_path / "requests.json", tmp_path / "hparams.json", tmp_path / "report.json"
    requests.write_text(json.dumps([REQUEST]))
    small_stats_hparams.save(hparams)
    result = CliRunner().invoke(main, [
        "edit", "--requests", str(requests), "--hparams", str(hparams), "--device", "cpu", "--dtype", "bfloat16",
        "--stats-dir", str(tmp_path / "stats"), "--report", str(report),
    ])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(report.read_text())
    assert entry["post"]["target_new_prob"] > 0.5 > entry["pre"]["target_new_prob"]


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_bfloat16_on_a_cpu_without_bfloat16_units_is_warned_about_once(monkeypatch, caplog, fresh_bfloat16_probe):
    flags = _cpuinfo_flags()
    if flags is not None and platform.machine() == "x86_64":
        # torch's probe agrees with what the kernel says of this CPU
        assert devices.cpu_lacks_bfloat16_units() == (not flags & {"avx512_bf16", "amx_tile"})
    for has_units in (False, True):
        monkeypatch.setattr(platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: has_units)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        fresh_bfloat16_probe()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="memit.utils.devices"):
            for _ in range(3):
                with bf16_autocast(True, "cpu"):
                    pass
            with bf16_autocast(False, "cpu"):
                pass
        warned = [r.getMessage() for r in caplog.records if "without bfloat16 units" in r.getMessage()]
        assert warned == ([] if has_units else ["bfloat16 autocast (--bf16) on a CPU without bfloat16 units (no AVX512_BF16 or AMX): "
                                                "torch computes its matrix products in software, tens of times slower than float32; "
                                                "use float32 on this machine"])


def test_bad_devices_and_dtypes_name_the_option():
    with pytest.raises(InputError, match="dtype: unknown dtype 'float8'"):
        load_model("default", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device: 'cuda:1' asked for, but torch sees no CUDA device"):
            load_model("default", device="cuda:1")
    with pytest.raises(InputError, match="offload_folder: a device map with 'disk' needs a folder"):
        load_model("default", device_map={"model": "disk"})
