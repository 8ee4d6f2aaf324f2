#!/usr/bin/env bash
# The comparisons of docs/tuning.md on Qwen2.5-Coder-0.5B-Instruct: the tuned preset against the
# default model's preset transferred as is and against the paper's GPT-J preset with its layers
# mapped by relative depth; 100 CounterFact cases of counterfact_subset400.json in one batch.
# Resumable: a run folder that exists is continued, and target vectors are cached per request.
#   bash experiments/tuning_proof.sh [naive|gptj|tuned ...]   (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=qwen2.5-coder-0.5b-instruct
DATA=${MEMIT_SHARED_DATA:-../shared/data}
OUT=results/tune_compare/qwen
mkdir -p "$OUT"
# GPT-J's layers 3-8 of 28 at the same relative depth of Qwen's 24 layers, its λ and optimisation;
# the statistics as the other two presets (2,000 Wikipedia-sample articles of 256 tokens), so
# that layers, λ and the target optimisation are what differ.
.venv/bin/python - "$OUT/MEMIT_gptj_mapped.json" <<'PY'
import json, sys
from memit import MEMITHyperParams
gptj = MEMITHyperParams.preset("EleutherAI_gpt-j-6B")
layers = sorted({round(layer * 24 / 28) for layer in gptj.layers})
mapped = {**gptj.to_dict(), "layers": layers, "rewrite_module_tmp": None, "layer_module_tmp": None,
          "mom2_dataset": "wikipedia-sample", "mom2_n_samples": 2000, "mom2_max_tokens": 256}
json.dump(mapped, open(sys.argv[1], "w"), indent=2)
PY
declare -A HPARAMS=([naive]=SmolLM2-135M-Instruct [gptj]="$OUT/MEMIT_gptj_mapped.json" [tuned]=qwen2.5-coder-0.5b-instruct)
mkdir -p "$OUT/.pre_cache"
for name in "${@:-tuned naive gptj}"; do
  for preset in $name; do
    out="$OUT/$preset"
    # The three runs score the same unedited model on the same cases: one cache serves them.
    mkdir -p "$out" && ln -sfn ../.pre_cache "$out/.pre_cache"
    resume=()
    [ -f "$out/MEMIT/run_000/params.json" ] && resume=(--continue-from-run run_000)
    .venv/bin/memit evaluate --model "$MODEL" --hparams "${HPARAMS[$preset]}" --data-file "$DATA/counterfact_subset400.json" \
      --limit 100 --num-edits 100 --skip-generation --use-cache --out "$out" "${resume[@]}"
  done
done
