#!/usr/bin/env bash
# Teacher-forced and generation-based metrics side by side: 100 CounterFact and
# 100 zsRE cases, each edited in one batch by MEMIT, AlphaEdit and ROME, scored with the
# prompts as written and wrapped in the model's chat template. Each edit is computed once
# (--reuse-edits: the chat run of a method loads the edit of its raw run) and a killed run
# continues where it stopped.
#   [ALGS="MEMIT ROME"] [DATASETS="cf"] [HPARAMS=preset] [MODEL=m] [LIMIT=n] bash experiments/one_batch_answer_views.sh [OUT]   (default results/answer_views)
# HPARAMS (one preset or file for every method in ALGS) replaces each method's default preset;
# MODEL (default: the default model) is any --model of memit evaluate; LIMIT (default 100) the
# number of cases, all edited in one batch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/answer_views}
DATA=${MEMIT_SHARED_DATA:-../shared/data}
MEMIT=${MEMIT:-.venv/bin/memit}
read -r -a ALGS <<< "${ALGS:-MEMIT AlphaEdit ROME}"
read -r -a DATASETS <<< "${DATASETS:-cf zsre}"
declare -A FILES=([cf]="$DATA/counterfact_subset400.json" [zsre]="$DATA/zsre_mend_eval_subset700.json")

# The run of ALG in OUT/DATASET asked with the chat template or not (empty if none yet).
run_of() {
  local chat=$([[ $3 == chat ]] && echo true || echo false)
  { grep -l "\"chat_template\": $chat" "$OUT/$1/$2"/run_*/params.json 2>/dev/null || true; } | head -n 1 | xargs -r dirname
}

for dataset in "${DATASETS[@]}"; do
  for alg in "${ALGS[@]}"; do
    for format in raw chat; do
      flags=(--alg "$alg" --dataset "$dataset" --data-file "${FILES[$dataset]}" --limit "${LIMIT:-100}" --num-edits "${LIMIT:-100}"
             --skip-generation --reuse-edits --out "$OUT/$dataset")
      [[ $format == chat ]] && flags+=(--chat-template)
      [[ -n ${HPARAMS:-} ]] && flags+=(--hparams "$HPARAMS")
      [[ -n ${MODEL:-} ]] && flags+=(--model "$MODEL")
      run=$(run_of "$dataset" "$alg" "$format")
      [[ -n $run ]] && flags+=(--continue-from-run "$run")
      echo "== $dataset $alg $format: $(date -u +%H:%M:%S)"
      "$MEMIT" evaluate "${flags[@]}" | tail -n 1
    done
  done
  echo "## $dataset"
  "$MEMIT" summarize --compare $(for f in raw chat; do for a in "${ALGS[@]}"; do run_of "$dataset" "$a" "$f"; done; done)
done
