#!/usr/bin/env bash
# The real-size run on a GPU machine that cannot reach the network, memit and the paper's code
# side by side (docs/large-runs.md#real-size-speed-and-memory-on-one-gpu).
#
#   bash benchmarks/scale_gpu_device.sh prepare        # here, with the network: fills .ref/
#   bash benchmarks/scale_gpu_device.sh PART... OUT    # there, with .ref/ carried beside the checkout
#
# prepare: a checkout of the paper's code (kmeng01/memit, or REF_SRC) in .ref/memit, the
# wheels its run needs beside the machine's torch (transformers 4.46, tokenizers 0.20,
# huggingface_hub 0.26, nltk; for PYTHON_VERSION, default 3.12) in .ref/wheels, the default
# model's tokenizer in .ref/tokenizer (neither run needs the default model installed) and the
# CounterFact files both runs read (from MEMIT_SHARED_DATA, default ../shared/data) in .ref/data.
# Parts, each within ten minutes on one H200 (PYTHON: the machine's Python with torch):
#   llama3-8b   memit, 10,000 requests, statistics from the packaged corpus's 2,000 samples
#   reference   the paper's code on the same shape, 100 requests, beside llama3-8b's figures
#   gptj-6b     memit, 1,000 requests
#   tiny        both on the 2-layer shape, a few requests: the script's own check, on any device
# Each writes OUT/<part>.json (and OUT/<part>.txt, its table).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ref=.ref

if [ "${1:-}" = prepare ]; then
  mkdir -p "$ref/wheels"
  [ -d "$ref/memit" ] || git clone -q "${REF_SRC:-https://github.com/kmeng01/memit}" "$ref/memit"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$ref/wheels" \
    transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5 nltk==3.9.1
  .venv/bin/python -c "from memit import load_model; load_model('default')[1].save_pretrained('$ref/tokenizer')"
  data=${MEMIT_SHARED_DATA:-../shared/data}
  mkdir -p "$ref/data/counterfact_mend"
  cp "$data/counterfact_subset400.json" "$ref/data/"
  cp "$data"/counterfact_mend/counterfact-{edit,train}.json "$ref/data/counterfact_mend/"
  echo "prepared $ref: carry it to the device with the checkout"
  exit 0
fi

[ $# -ge 2 ] || { echo "usage: $0 prepare | $0 PART... OUT (parts: llama3-8b reference gptj-6b tiny)" >&2; exit 2; }
out=${*: -1}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 MEMIT_SHARED_DATA=$PWD/$ref/data
site=$(mktemp -d)
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$ref"/wheels/*.whl
memit_run() {  # NAME ARGS...: memit's phases
  local name=$1; shift
  "$PYTHON" benchmarks/scale_gpu.py --tokenizer "$ref/tokenizer" "$@" --out "$out/$name.json" | tee "$out/$name.txt"
}
reference_run() {  # NAME MEMIT_JSON ARGS...: the paper's code, with transformers 4.46 ahead of the machine's
  local name=$1 memit=$2; shift 2
  PYTHONPATH=$site "$PYTHON" benchmarks/scale_gpu_reference.py --src "$ref/memit" --tokenizer "$ref/tokenizer" \
    --memit "$memit" "$@" --out "$out/$name.json" | tee "$out/$name.txt"
}
for part in "${@:1:$#-1}"; do
  case $part in
    llama3-8b) memit_run llama3-8b --shape llama3-8b --requests 10000 --stats-samples 2000 --batch-sizes 16,64,256 --batch-size 256 ;;
    reference) reference_run reference_llama3-8b "$out/llama3-8b.json" --shape llama3-8b --requests 100 --stats-samples 2000 --cases 100 ;;
    gptj-6b) memit_run gptj-6b --shape gptj-6b --requests 1000 --stats-samples 2000 ;;
    tiny)
      tiny=(--shape tiny --requests 3 --stats-samples 12 --steps 2 --cases 2)
      memit_run tiny "${tiny[@]}" --batch-sizes 2 --batch-size 3
      reference_run reference_tiny "$out/tiny.json" "${tiny[@]}" ;;
    *) echo "unknown part '$part' (parts: llama3-8b reference gptj-6b tiny)" >&2; exit 2 ;;
  esac
done
