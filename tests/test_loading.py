"""Loading models: the default, a GGUF file, a local folder; fingerprints."""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from memit import load_model
from memit.models.loading import _packaged_default_gguf, default_model_dir, model_fingerprint


def test_default_model_is_converted_once_and_loads(default_model):
    model, tok = default_model
    assert (default_model_dir() / "model.safetensors").is_file()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.padding_side == "right" and tok.pad_token is not None
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].argmax()
    assert tok.decode(top) == " Paris"


def test_gguf_file_loads_to_the_same_weights_as_the_converted_default(default_model):
    model, _ = default_model
    from_gguf, tok = load_model(str(_packaged_default_gguf()))
    assert tok("Hello world")["input_ids"] == default_model[1]("Hello world")["input_ids"]
    for name in ("model.layers.4.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(from_gguf.get_parameter(name), model.get_parameter(name))
    assert model_fingerprint(from_gguf) == model_fingerprint(model)


def test_local_folder_loads(tmp_path, default_model):
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=49152)
    tiny = AutoModelForCausalLM.from_config(config)
    tiny.save_pretrained(tmp_path)
    default_model[1].save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight, tiny.model.layers[1].mlp.down_proj.weight)
    assert model_fingerprint(loaded) == model_fingerprint(tiny) != model_fingerprint(default_model[0])


def test_a_gguf_split_across_packages_is_assembled_checked_and_loaded(default_model, tmp_path, monkeypatch):
    """The form of the Qwen extra (a GGUF in chunks, one per PyPI package), here with the default
    model's GGUF cut in two."""
    import dataclasses
    import hashlib

    import pytest

    from memit.errors import InputError
    from memit.models.packaged import PACKAGED_MODELS, PackagedGGUF, assemble_gguf

    data = _packaged_default_gguf().read_bytes()
    for i, chunk in enumerate((data[: len(data) // 2], data[len(data) // 2 :]), 1):
        package = tmp_path / "site" / f"memit_test_chunk{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part0{i}.bin").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MEMIT_HOME", str(tmp_path / "home"))
    spec = PackagedGGUF("chunked-smollm2", tuple((f"memit_test_chunk{i}", f"data/part0{i}.bin") for i in (1, 2)),
                        install="pip install memit-test-chunks", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(PACKAGED_MODELS, spec.name, spec)

    model, _ = load_model(spec.name)
    assert model_fingerprint(model) == model_fingerprint(default_model[0])
    assert (tmp_path / "home" / "models" / "chunked-smollm2.gguf").read_bytes() == data
    assert (tmp_path / "home" / "models" / "chunked-smollm2" / "config.json").is_file()

    with pytest.raises(InputError, match="SHA-256"):
        assemble_gguf(dataclasses.replace(spec, sha256="0" * 64), tmp_path / "bad.gguf")
    assert list(tmp_path.glob("*bad.gguf*")) == []
    with pytest.raises(ModuleNotFoundError, match="pip install memit-test-chunks"):
        assemble_gguf(dataclasses.replace(spec, chunks=(("memit_no_such_package", "x.bin"),)), tmp_path / "none.gguf")


def test_processes_that_convert_the_default_model_at_once_all_get_a_whole_folder(default_model, tmp_path):
    """The ranks of a torchrun job on a fresh machine all convert the packaged GGUF at the same
    time; none may read or delete another's half-written folder."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEMIT_HOME": str(tmp_path)}
    code = "from memit.models.loading import default_model_dir; print(default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err[-2000:] for _, err, _ in results]
    folder = tmp_path / "models" / default_model_dir().name
    assert {out.strip() for out, _, _ in results} == {str(folder)}
    assert [p.name for p in (tmp_path / "models").iterdir()] == [folder.name]
    loaded, _ = load_model(str(folder))
    assert model_fingerprint(loaded) == model_fingerprint(default_model[0])
