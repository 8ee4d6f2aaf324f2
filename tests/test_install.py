"""memit installs beside the torch a user already has: pyproject.toml holds ranges, and the
exact versions CI tests live in constraints.txt."""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import subprocess
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
# The oldest torch the tiny-architecture tests ran on (scripts/compat.sh can take it).
OTHER_TORCH = "2.6.0"


def requirements() -> dict[str, Requirement]:
    """The installed memit's dependencies (pyproject.toml's, read the same way on every Python)."""
    reqs = [Requirement(text) for text in importlib.metadata.requires("memit") or []]
    return {canonicalize_name(r.name): r for r in reqs if r.marker is None or "extra" not in str(r.marker)}


def pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    return {canonicalize_name(name): version for name, _, version in (line.partition("==") for line in lines if "==" in line)}


def test_requirements_are_ranges_that_admit_the_pins_and_another_torch():
    reqs, pinned = requirements(), pins()
    for name in ("torch", "transformers", "accelerate", "gguf"):
        assert not any(spec.operator == "==" for spec in reqs[name].specifier), name
        assert reqs[name].specifier.contains(pinned[name]), (name, pinned[name])
    assert reqs["torch"].specifier.contains(OTHER_TORCH)
    assert reqs["transformers"].specifier.contains("4.46.0")
    assert not reqs["transformers"].specifier.contains("6.0.0")


def metadata_only_wheel(folder: Path, name: str, version: str) -> Path:
    """A wheel that pip installs as ``name`` ``version`` but that holds no code."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: memit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def test_editable_install_keeps_the_torch_already_there(tmp_path):
    """Resolves against the package index (PyPI): a dry run that installs nothing."""
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    wheel = metadata_only_wheel(tmp_path, "torch", OTHER_TORCH)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "install", "--no-index", "--no-deps", str(wheel)], check=True)
    report = tmp_path / "report.json"
    try:
        subprocess.run(
            [*pip, "install", "--dry-run", "--report", str(report), "-e", str(REPO)],
            check=True, capture_output=True, text=True, timeout=600,
        )
    except subprocess.CalledProcessError as error:
        if "Could not find a version" in error.stderr or "NewConnectionError" in error.stderr:
            pytest.skip(f"package index not reachable: {error.stderr[-300:]}")
        raise
    installs = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert "memit" in installs
    assert "torch" not in installs, installs["torch"]
    assert installs["transformers"]
