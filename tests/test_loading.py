"""Loading models: the default, a GGUF file, a local folder; fingerprints."""
import torch

from memit import load_model
from memit.models.loading import _packaged_default_gguf, default_model_dir, model_fingerprint

from .conftest import random_llama


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
    tiny = random_llama(head_scale=1.0, vocab_size=49152)
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


def test_a_damaged_default_gguf_is_refused_before_conversion(tmp_path):
    import pytest

    from memit.errors import InputError, MissingFileError
    from memit.models.loading import check_default_gguf

    good = _packaged_default_gguf()
    assert check_default_gguf(good) == good
    truncated = tmp_path / good.name
    with good.open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    with pytest.raises(InputError, match=rf"model: {truncated} holds 1,048,576 bytes, expected 98,362,432; reinstall"):
        check_default_gguf(truncated)
    # Same size, one byte changed: only the hash can tell.
    altered = tmp_path / "altered.gguf"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 1
    altered.write_bytes(bytes(data))
    with pytest.raises(InputError, match=rf"model: {altered} has SHA-256 [0-9a-f]{{64}}, expected"):
        check_default_gguf(altered)
    with pytest.raises(MissingFileError, match="does not exist"):
        check_default_gguf(tmp_path / "none.gguf")


def test_a_model_path_that_does_not_exist_is_one_line_error(tmp_path):
    import pytest
    from click.testing import CliRunner

    from memit.cli import main
    from memit.errors import MissingFileError
    from memit.models.loading import looks_like_path

    for name in ("/some/dir/that/is/not/there", "./not-there", "~/not-there-memit", "models/a/b", str(tmp_path / "x.gguf")):
        assert looks_like_path(name)
        with pytest.raises(MissingFileError, match=f"model: .*{name.rsplit('/', 1)[-1]} does not exist"):
            load_model(name, device="cpu")
    # Hub ids are not paths, and neither is a name that only might be one.
    assert not any(map(looks_like_path, ("gpt2", "EleutherAI/gpt-j-6B", "default")))
    requests = tmp_path / "requests.json"
    requests.write_text('[{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}]')
    result = CliRunner().invoke(main, ["edit", "--model", "/some/dir/that/is/not/there", "--requests", str(requests)])
    assert result.exit_code != 0 and "model: /some/dir/that/is/not/there does not exist" in result.output
    assert "Traceback" not in result.output and "Repo id" not in result.output


def test_what_the_hub_loader_refuses_is_an_input_error_naming_the_model(monkeypatch):
    import pytest

    from memit.errors import InputError
    from memit.models import loading

    # An invalid repo id is refused by huggingface_hub before any network access.
    with pytest.raises(InputError, match=r"^model: not a repo id could not be loaded: Repo id must"):
        load_model("not a repo id", device="cpu")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files,\nand couldn't find them in the cached files.")

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(InputError, match=r"^model: some-org/some-model could not be loaded: We couldn't connect .* files, and couldn't") as info:
        load_model("some-org/some-model", device="cpu")
    assert "\n" not in str(info.value)
