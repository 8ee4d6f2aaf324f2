"""The repository holds source, tests, docs and small data, and its code passes the linter."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 1_000_000
# Data the package needs at run time: the Wikipedia sample the presets' key statistics use.
LARGE_FILES_ALLOWED = {"src/memit/data/wikipedia_en_2015_sample2000.jsonl.gz"}
LINTED = ["src", "tests", "benchmarks", "scripts", "experiments"]


def _tracked_files() -> list[str]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


def test_no_large_file_is_tracked_outside_the_allow_list():
    large = [name for name in _tracked_files()
             if (REPO / name).is_file() and (REPO / name).stat().st_size > MAX_BYTES and name not in LARGE_FILES_ALLOWED]
    assert large == [], f"tracked files over {MAX_BYTES} bytes (generated or binary?): {large}"


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", *LINTED], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
