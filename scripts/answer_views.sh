#!/usr/bin/env bash
# Teacher-forced and generation-based metrics side by side (issue 14): 100 CounterFact and
# 100 zsRE cases, each edited in one batch by MEMIT, AlphaEdit and ROME, scored with the
# prompts as written and wrapped in the model's chat template. Each edit is computed once
# (--reuse-edits) and scored both ways; a killed run continues where it stopped.
#   bash scripts/answer_views.sh [OUT]      (default results/answer_views)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/answer_views}
DATA=${MEMIT_SHARED_DATA:-../shared/data}
MEMIT=${MEMIT:-.venv/bin/memit}
declare -A FILES=([cf]="$DATA/counterfact_subset400.json" [zsre]="$DATA/zsre_mend_eval_subset700.json")
for dataset in cf zsre; do
  for alg in MEMIT AlphaEdit ROME; do
    for format in raw chat; do
      out="$OUT/${dataset}_${format}"
      flags=(--alg "$alg" --dataset "$dataset" --data-file "${FILES[$dataset]}" --limit 100 --num-edits 100
             --skip-generation --reuse-edits --out "$out")
      [[ $format == chat ]] && flags+=(--chat-template)
      [[ -f "$out/$alg/run_000/params.json" ]] && flags+=(--continue-from-run run_000)
      echo "== $dataset $alg $format: $(date -u +%H:%M:%S)"
      "$MEMIT" evaluate "${flags[@]}" | tail -n 3
    done
  done
done
for dataset in cf zsre; do
  echo "## $dataset"
  "$MEMIT" summarize --compare "$OUT/${dataset}_raw"/*/run_000 "$OUT/${dataset}_chat"/*/run_000
done
