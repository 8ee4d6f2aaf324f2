"""Exports read by their real consumers: the PEFT adapter by peft, the merged folder by
transformers, the patched GGUF by transformers' GGUF loader; on the default model and on tiny
random GPT-2 and Qwen2 models."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from memit import WeightDeltas, edit_model, load_model
from memit.chain import load_edits
from memit.errors import InputError
from memit.models.loading import _packaged_default_gguf, model_fingerprint
from memit.predict import top_next_tokens

peft = pytest.importorskip("peft")

REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}, "target_true": {"str": "basketball"}},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
    {"prompt": "{} was written in the language", "subject": "Don Quixote", "target_new": {"str": "German"}},
]
EDIT_PROMPTS = [r["prompt"].format(r["subject"]) for r in REQUESTS]
OTHER_PROMPTS = ["Michael Jordan plays the sport of", "The capital of Germany is", "My favourite food is"]


@pytest.fixture(scope="module")
def edit(default_model, default_hparams, tmp_path_factory):
    """Three MEMIT edits of the default model, saved and reverted (the model is unedited after)."""
    model, tok = default_model
    deltas = edit_model(model, tok, REQUESTS, dataclasses.replace(default_hparams, v_num_grad_steps=10))
    deltas.revert(model)
    folder = tmp_path_factory.mktemp("edit") / "deltas"
    deltas.save(folder)
    return WeightDeltas.load(folder), folder


def logits(model, tok, prompts):
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


def edited_state(model, tok, deltas, prompts):
    """Logits, weights and top tokens of ``model`` with ``deltas`` applied (reverted after)."""
    deltas.apply(model)
    try:
        return (logits(model, tok, prompts), {n: model.get_parameter(n).detach().clone() for n in deltas.deltas},
                [top_next_tokens(model, tok, p, k=1)[0][0] for p in EDIT_PROMPTS])
    finally:
        deltas.revert(model)


def test_exact_peft_adapter_gives_the_edited_model(edit, default_model, tmp_path):
    deltas, _ = edit
    model, tok = default_model
    prompts = EDIT_PROMPTS + OTHER_PROMPTS
    expected_logits, expected_weights, _ = edited_state(model, tok, deltas, prompts)
    report = deltas.to_peft(tmp_path / "adapter", model=model)

    assert report["max_relative_error"] < 1e-6
    assert {m["rank"] for m in report["modules"].values()} == {3}  # one per edit
    assert report["adapter_bytes"] * 50 < report["full_matrices_bytes"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 3
    assert config["target_modules"] == sorted(n.removesuffix(".weight") for n in deltas.deltas)
    assert json.loads((tmp_path / "adapter" / "export_report.json").read_text())["modules"] == report["modules"]

    base = load_model("default")[0]  # peft changes the model it wraps
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert float((logits(adapted, tok, prompts) - expected_logits).abs().max()) <= 1e-3
    merged = adapted.merge_and_unload()
    for name, weight in expected_weights.items():
        torch.testing.assert_close(merged.get_parameter(name), weight, atol=1e-6, rtol=0)


def test_truncated_adapter_reports_its_error_and_efficacy(edit, default_model, tmp_path):
    deltas, _ = edit
    model, tok = default_model
    before = {n: model.get_parameter(n).detach().clone() for n in deltas.deltas}
    report = deltas.to_peft(tmp_path / "adapter", model=model, tok=tok, rank=1)
    assert {m["rank"] for m in report["modules"].values()} == {1}
    assert all(m["relative_error"] > 0.1 and m["exact_rank"] == 3 for m in report["modules"].values())
    assert set(report["efficacy"]) == {"exact_deltas", "adapter"} and report["efficacy"]["exact_deltas"] > 0
    assert json.loads((tmp_path / "adapter" / "export_report.json").read_text())["efficacy"] == report["efficacy"]
    for name, weight in before.items():  # merged in memory and reverted exactly
        assert torch.equal(model.get_parameter(name), weight)
    energy = deltas.to_peft(tmp_path / "energy", energy=0.999)
    assert {m["rank"] for m in energy["modules"].values()} == {3} and "efficacy" not in energy


def test_hf_export_loads_and_says_the_new_targets(edit, default_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    deltas, _ = edit
    model, tok = default_model
    _, _, edited_top = edited_state(model, tok, deltas, EDIT_PROMPTS)
    deltas.export(tmp_path / "hf", "hf", model=model, tok=tok)
    assert not deltas.applied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert [top_next_tokens(loaded, loaded_tok, p, k=1)[0][0] for p in EDIT_PROMPTS] == edited_top
    assert edited_top[:2] == [" football", " Rome"]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "LeBron James" in card and "Rome" in card and '"v_num_grad_steps": 10' in card
    assert (tmp_path / "hf" / "generation_config.json").is_file()


def test_gguf_export_of_the_default_model(edit, default_model, tmp_path):
    from gguf import GGUFReader

    deltas, _ = edit
    model, tok = default_model
    base = _packaged_default_gguf()
    # Q4_1's rounding step is larger than this edit: re-quantising would drop it.
    with pytest.raises(InputError, match="as Q4_1 loses .* of the edit"):
        deltas.export(tmp_path / "lost", "gguf", model=model, base=base)
    assert not (tmp_path / "lost").exists()

    _, _, edited_top = edited_state(model, tok, deltas, EDIT_PROMPTS)
    report = deltas.export(tmp_path / "gguf", "gguf", model=model, base=base, edited_type="q8_0")
    written = tmp_path / "gguf" / base.name
    assert {t["type"] for t in report["tensors"].values()} == {"Q8_0"}
    assert report["max_error_of_delta"] < 0.5

    loaded, loaded_tok = load_model(str(written))
    assert [top_next_tokens(loaded, loaded_tok, p, k=1)[0][0] for p in EDIT_PROMPTS] == edited_top
    original, patched = GGUFReader(base), GGUFReader(written)
    patched_tensors = {t.name: t for t in patched.tensors}
    untouched = [t for t in original.tensors if t.name not in report["tensors"]]
    assert len(untouched) == len(original.tensors) - len(deltas.deltas)
    for tensor in untouched:
        assert patched_tensors[tensor.name].tensor_type == tensor.tensor_type
        assert patched_tensors[tensor.name].data.tobytes() == tensor.data.tobytes(), tensor.name
    # Header and metadata: the bytes before the tensor table.
    table = min(t.field.offset for t in original.tensors)
    assert base.read_bytes()[:table] == written.read_bytes()[:table]


# Tiny random models of two more architectures, with additive random deltas on their MLP output weights.

def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval(), [f"transformer.h.{i}.mlp.c_proj.weight" for i in range(2)]


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(config).eval(), [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]


def tiny_llama(seed=3, hidden=32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # 256 inputs to the MLP output weight: one block of a K-quant per row.
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config).eval(), [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]


def random_deltas(model, names, rank=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name in names:
        shape = model.get_parameter(name).shape
        deltas[name] = 0.1 * torch.randn(shape[0], rank, generator=generator) @ torch.randn(rank, shape[1], generator=generator)
    requests = [{"prompt": "{} is", "subject": "x", "target_new": {"str": "y"}}]
    return WeightDeltas(deltas, {"algorithm": "test", "hparams": {}, "requests": requests, "model_fingerprint": model_fingerprint(model)})


def ids_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_qwen2], ids=["gpt2", "qwen2"])
def test_peft_and_hf_exports_of_other_architectures(build, tmp_path):
    from transformers import AutoModelForCausalLM

    model, names = build()
    deltas = random_deltas(model, names)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    base_logits = ids_logits(model, ids)
    deltas.apply(model)
    expected, weights = ids_logits(model, ids), {n: model.get_parameter(n).detach().clone() for n in names}
    deltas.revert(model)

    report = deltas.to_peft(tmp_path / "adapter", model=model)
    assert {m["rank"] for m in report["modules"].values()} == {2} and report["max_relative_error"] < 1e-6
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (build is tiny_gpt2)  # GPT-2's Conv1D stores in x out

    deltas.export(tmp_path / "hf", "hf", model=model)
    assert torch.equal(ids_logits(model, ids), base_logits)  # reverted after saving
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert float((ids_logits(loaded, ids) - expected).abs().max()) <= 1e-5

    adapted = peft.PeftModel.from_pretrained(model, tmp_path / "adapter")
    assert float((ids_logits(adapted, ids) - expected).abs().max()) <= 1e-4
    merged = adapted.merge_and_unload()
    for name, weight in weights.items():
        torch.testing.assert_close(merged.get_parameter(name), weight, atol=1e-6, rtol=0)


def test_modules_of_different_ranks_get_their_own_rank(tmp_path):
    model, names = tiny_qwen2()
    deltas = random_deltas(model, names)
    deltas.deltas[names[1]] = deltas.deltas[names[1]][:, :1] @ torch.ones(1, deltas.deltas[names[1]].shape[1])  # rank 1
    deltas.to_peft(tmp_path / "adapter", model=model)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["rank_pattern"] == config["alpha_pattern"] == {r"model\.layers\.1\.mlp\.down_proj": 1}
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(6))
    deltas.apply(model)
    expected = ids_logits(model, ids)
    deltas.revert(model)
    adapted = peft.PeftModel.from_pretrained(model, tmp_path / "adapter")
    assert adapted.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.shape[0] == 1
    assert float((ids_logits(adapted, ids) - expected).abs().max()) <= 1e-4


# GGUF files of a tiny random Llama, written with the gguf package.

def write_gguf(path, model, arch="llama", qtype=None, shape_of=None):
    """``model``'s weights as a GGUF file: F16 (or ``qtype`` raw random bytes for the MLP
    output weights), with ``shape_of`` overriding a tensor's shape (random values)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    blocks = model.config.num_hidden_layers
    writer.add_block_count(blocks)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)
    for name, param in model.state_dict().items():
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            continue
        array = param.numpy().astype(np.float16)
        if shape_of and gguf_name in shape_of:
            array = np.random.default_rng(0).standard_normal(shape_of[gguf_name]).astype(np.float16)
        if qtype is not None and "ffn_down" in gguf_name:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.random.default_rng(0).integers(0, 255, (array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(gguf_name, raw, raw_dtype=qtype)
            continue
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_export_keeps_f16_tensors_in_place(tmp_path):
    from gguf import GGUFReader

    model, names = tiny_llama(hidden=64)
    with torch.no_grad():  # the model as the F16 file holds it
        for param in model.parameters():
            param.copy_(param.half().float())
    base = write_gguf(tmp_path / "tiny.gguf", model)
    deltas = random_deltas(model, names)
    report = deltas.export(tmp_path / "out", "gguf", model=model, base=base)
    written = tmp_path / "out" / "tiny.gguf"
    assert written.stat().st_size == base.stat().st_size
    assert {t["type"] for t in report["tensors"].values()} == {"F16"}
    patched = {t.name: t for t in GGUFReader(written).tensors}
    for tensor in GGUFReader(base).tensors:
        new = patched[tensor.name]
        if tensor.name in report["tensors"]:
            hf_name = report["tensors"][tensor.name]["hf_name"]
            expected = (model.get_parameter(hf_name).detach().double() + deltas.deltas[hf_name].double()).float().half().numpy()
            assert np.array_equal(new.data, expected), tensor.name
        else:
            assert new.data.tobytes() == tensor.data.tobytes(), tensor.name


def test_gguf_that_is_not_the_base_is_refused(tmp_path):
    import gguf

    model, names = tiny_llama(hidden=64)
    deltas = random_deltas(model, names)
    other, _ = tiny_llama(seed=9, hidden=64)
    cases = {
        "another_model": (write_gguf(tmp_path / "a.gguf", other), "blk.0.ffn_down.weight .* differs from the model's"),
        "shape": (write_gguf(tmp_path / "b.gguf", model, shape_of={"blk.1.ffn_down.weight": (64, 32)}),
                  r"tensor blk.1.ffn_down.weight .* has shape \(64, 32\)"),
        "arch": (write_gguf(tmp_path / "c.gguf", model, arch="qwen2"), "holds a qwen2 model, not the edited model's architecture"),
        "type": (write_gguf(tmp_path / "d.gguf", model, qtype=gguf.GGMLQuantizationType.Q6_K),
                 "blk.0.ffn_down.weight is Q6_K, a type the installed gguf package cannot quantise"),
    }
    for case, (base, message) in cases.items():
        with pytest.raises(InputError, match=message):
            deltas.export(tmp_path / case, "gguf", model=model, base=base)
        assert not (tmp_path / case).exists(), case


def test_bad_peft_input_is_refused_without_output(edit, default_model, tmp_path):
    deltas, _ = edit
    model, _ = default_model
    with pytest.raises(InputError, match=r"rank: 600 is larger than model\.layers\.4\.mlp\.down_proj allows"):
        deltas.to_peft(tmp_path / "big", rank=600)
    foreign = WeightDeltas(dict(deltas.deltas), {**deltas.manifest, "model_fingerprint": "0123456789abcdef"})
    for format in ("peft", "hf"):
        with pytest.raises(InputError, match="made for model 0123456789abcdef, not this one"):
            foreign.export(tmp_path / format, format, model=model)
    with pytest.raises(InputError, match="not a matrix weight"):
        WeightDeltas({"model.norm.weight": torch.ones(576)}).to_peft(tmp_path / "norm")
    assert not any(tmp_path.iterdir())


def test_chain_folder_exports_the_sum_of_its_batches(tmp_path):
    model, names = tiny_qwen2()
    first, second = random_deltas(model, names, seed=1), random_deltas(model, names[:1], seed=2)
    first.save(tmp_path / "chain" / "batch_00000")
    second.save(tmp_path / "chain" / "batch_00001")
    (tmp_path / "chain" / "chain.json").write_text(json.dumps({
        "algorithm": "MEMIT", "hparams": {}, "model_fingerprint": model_fingerprint(model), "batches": ["batch_00000", "batch_00001"],
    }))
    total = load_edits(tmp_path / "chain")
    torch.testing.assert_close(total.deltas[names[0]], first.deltas[names[0]] + second.deltas[names[0]])
    torch.testing.assert_close(total.deltas[names[1]], first.deltas[names[1]])
    assert len(total.manifest["requests"]) == 2
    report = total.to_peft(tmp_path / "adapter", model=model)
    assert report["modules"]["model.layers.0.mlp.down_proj"]["rank"] == 4


def test_cli_export(edit, tmp_path):
    from memit.cli import main

    _, folder = edit
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "peft", "--out", str(tmp_path / "adapter")])
    assert result.exit_code == 0, result.output
    assert "rank 3" in result.output and (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "peft", "--out", str(tmp_path / "big"), "--rank", "600"])
    assert result.exit_code == 1 and "Error: rank: 600 is larger than" in result.output
    assert not (tmp_path / "big").exists()
    result = CliRunner().invoke(main, ["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "--base" in result.output
    result = CliRunner().invoke(main, ["export", str(tmp_path), "--format", "peft", "--out", str(tmp_path / "none")])
    assert result.exit_code == 1 and "holds neither saved deltas" in result.output


def test_cli_edit_saves_an_exact_peft_adapter(default_hparams, tmp_path, monkeypatch):
    """`memit edit --save DIR --format peft`: the adapter on a fresh copy of the model gives the
    logits of the model the command edited (kept in memory here by handing the command the model)."""
    import memit.models
    from memit.cli import main

    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps(REQUESTS[:2]))
    hparams = tmp_path / "hparams.json"
    dataclasses.replace(default_hparams, v_num_grad_steps=10).save(hparams)
    edited, tok = load_model("default")
    monkeypatch.setattr(memit.models, "load_model", lambda *args, **kwargs: (edited, tok))

    adapter = tmp_path / "adapter"
    result = CliRunner().invoke(main, ["edit", "--requests", str(requests), "--hparams", str(hparams), "--save", str(adapter), "--format", "peft"])
    assert result.exit_code == 0, result.output
    assert "rank 2" in result.output and f"Exported (peft) to {adapter}" in result.output
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "export_report.json"]
    prompts = EDIT_PROMPTS[:2] + OTHER_PROMPTS
    expected = logits(edited, tok, prompts)
    assert [top_next_tokens(edited, tok, p, k=1)[0][0] for p in EDIT_PROMPTS[:2]] == [" football", " Rome"]
    monkeypatch.undo()
    adapted = peft.PeftModel.from_pretrained(load_model("default")[0], adapter)
    assert float((logits(adapted, tok, prompts) - expected).abs().max()) <= 1e-3

    # Checked before the model is loaded: --format needs --save, gguf needs --base, and a chain is exported whole.
    for args, message in [
        (["--format", "peft"], "needs --save DIR"),
        (["--save", str(tmp_path / "g"), "--format", "gguf"], "--format gguf needs --base"),
        (["--save", str(tmp_path / "d"), "--format", "hf", "--deltas-only"], "not both"),
        (["--save", str(tmp_path / "c"), "--format", "peft", "--chain", str(tmp_path / "chain")], "memit export"),
    ]:
        result = CliRunner().invoke(main, ["edit", "--requests", str(requests), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    assert not any((tmp_path / name).exists() for name in "gdc")
