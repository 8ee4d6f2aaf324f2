#!/usr/bin/env bash
# Paper-scale experiments on the default model, cases from MEND's counterfact-edit.json:
#   scaling  MEMIT and AlphaEdit, one batch of 1 .. 10,000 edits (target vectors cached per
#            request in the curve's own folder, so each case's z is computed once for the whole
#            curve and both methods, and experiments/paper_scale_report.py reads what they cost);
#            fluency on every 10th case; target vectors and statistics under bfloat16 autocast
#            (--bf16: half the time of float32 on this CPU's bfloat16 units; solves in float64,
#            scoring in float32);
#   sequential  MEMIT, AlphaEdit and ROME (and AlphaEdit with ridge 10), 2,000 edits in batches of 100, every case so far
#            scored after 500, 1,000, 1,500 and 2,000 edits (earlier batches reloaded from the
#            edit cache); fluency on every 5th case.
#   rome-bf16  ROME's third sequential run to 2,000 edits, its target vectors under bfloat16
#            autocast (about 3 s a request on one thread, against 4-5 s in float32): one process
#            makes the 20 batches into the edit cache (scoring only the cheap teacher-forced
#            metrics, in a folder of its own), the other scores the
#            checkpoint at 500 edits as soon as its batches are made, then, once the chain is
#            done, those at 2,000 and 1,500 in NPROC processes. Where a request takes longer (5.5 s
#            on one thread of an AVX512_BF16 CPU without AMX), CHAIN_THREADS=2 gives the chain
#            both cores (4 s a request), the 500-edit scoring sharing them.
#   lifelong  MEMIT with its sequential preset (earlier edits' keys preserved, most-probable early
#            stop, target vectors from the unedited model, computed first by NPROC processes into the
#            default target cache), EDITS (default 2,000) edits in batches of 100, every case so far
#            scored teacher-forced after each quarter; then the last point again with generated
#            answers (its batches from the edit cache). EDITS=10000 continues the 2,000-edit chain
#            (its first 20 batches from the edit cache); its target vectors are best computed first
#            on a GPU (memit targets --limit 10000 --use-cache, float32) and the cache carried over.
#   ablation  each of VARIANTS (hyperparameter JSON files: the sequential preset with one setting
#            changed) at 2,000 edits, teacher-forced, into results/ablation/NAME; variants with the
#            preset's target settings read the lifelong part's target vectors from the default cache.
#   lifelong-bf16  the same protocol (EDITS edits; every SCORE_INTERVAL-th of them scored, default
#            all) for the configuration VARIANT (a preset name or JSON file; default
#            the sequential preset) on MODEL (default: the default model; e.g.
#            MODEL=qwen2.5-coder-0.5b-instruct VARIANT=qwen2.5-coder-0.5b-instruct-sequential)
#            into OUT (default results/lifelong_bf16), target vectors under
#            bfloat16 autocast: computed first, NPROC processes sharing them, into OUT/.target_cache
#            (target vectors from the unedited model do not depend on the chain), then the chain
#            reads them; variants with the same target settings share that cache through OUT.
#            A variant with target vectors from the edited model computes them in the chain.
# MEND's files have no generation prompts: fluency is generated from each case's edit prompt and
# rephrase.
# Hours on a CPU; everything resumes where it stopped: run it again after a kill.
#   NPROC=2 nohup bash experiments/paper_scale.sh [scaling] [sequential] [rome-bf16] [lifelong] > results/paper.log 2>&1 &
# NPROC > 1 runs each command under torchrun, one process (and thread) per core.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MEMIT_SHARED_DATA:-../shared/data}/counterfact_mend/counterfact-edit.json
NPROC=${NPROC:-1}
# the lifelong and ablation chains: batches of 100, edits and target vectors reused from their caches
chain_options=(--data-file "$DATA" --num-edits 100 --reuse-edits --use-cache --skip-generation)
memit() {
  if [ "$NPROC" -gt 1 ]; then
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node "$NPROC" -m memit "$@"
  else
    .venv/bin/memit "$@"
  fi
}
# The scaling curve's cached target vectors and ROME's third run are bfloat16 (keyed so): on a CPU
# without bfloat16 units that is tens of times slower than float32 (747 against 11 ms for one
# matrix product on a 2-core AVX2 EPYC), so those parts stop there instead of running for days.
needs_bf16_units() {
  if .venv/bin/python -c "from memit.utils.devices import cpu_lacks_bfloat16_units as f; raise SystemExit(f())"; then return; fi
  echo "part '$1' computes in bfloat16, and this CPU has no bfloat16 units (no avx512_bf16 or amx): run it on a machine that has them (the scaling curve: or fill its target cache on a GPU with 'memit targets')" >&2
  exit 2
}
# the lifelong chains: EDITS edits scored after each quarter, every SCORE_INTERVAL-th case
edits=${EDITS:-2000}
score_interval=${SCORE_INTERVAL:-1}
if [ $((edits % 400)) -ne 0 ]; then echo "EDITS=$edits: a multiple of 400 (four checkpoints of whole batches of 100)" >&2; exit 2; fi
quarters="$((edits / 400)),$((edits / 200)),$((3 * edits / 400)),$((edits / 100))"
for part in "${@:-scaling sequential}"; do
  for what in $part; do
    if [ "$what" = scaling ]; then
      needs_bf16_units scaling
      for alg in MEMIT AlphaEdit; do
        memit scale --alg "$alg" --data-file "$DATA" --num-edits 1,10,100,1000,3000,10000 --min-cases 100 --bf16 \
          --generation-interval 10 --target-cache results/paper_scaling/.target_cache --out results/paper_scaling
      done
    elif [ "$what" = rome-bf16 ]; then
      needs_bf16_units rome-bf16
      rome=(--alg ROME --bf16 --data-file "$DATA" --num-edits 100 --reuse-edits --use-cache)
      mkdir -p results/rome_bf16/.edit_cache results/rome_chain
      ln -sfn ../rome_bf16/.edit_cache results/rome_chain/.edit_cache
      OMP_NUM_THREADS=${CHAIN_THREADS:-1} .venv/bin/memit scale "${rome[@]}" --sequential-batches 20 --skip-generation --no-generated-answers \
        --out results/rome_chain > results/rome_chain.log 2>&1 &
      chain=$!
      while [ "$(find results/rome_bf16/.edit_cache -name edit_config.json | wc -l)" -lt 5 ]; do sleep 20; done
      OMP_NUM_THREADS=1 .venv/bin/memit scale "${rome[@]}" --sequential-batches 5 --generation-interval 5 --out results/rome_bf16
      wait "$chain"
      for k in 20 15; do memit scale "${rome[@]}" --sequential-batches "$k" --generation-interval 5 --out results/rome_bf16; done
    elif [ "$what" = lifelong ]; then
      # target vectors from the unedited model do not depend on the chain: computed first, NPROC processes sharing them
      memit targets --hparams SmolLM2-135M-Instruct-sequential --data-file "$DATA" --limit "$edits" --use-cache
      lifelong=(--alg MEMIT --hparams SmolLM2-135M-Instruct-sequential "${chain_options[@]}")
      memit scale "${lifelong[@]}" --sequential-batches "$quarters" --no-generated-answers --out results/memit_sequential
      mkdir -p results/memit_sequential_answers
      ln -sfn ../memit_sequential/.edit_cache results/memit_sequential_answers/.edit_cache
      memit scale "${lifelong[@]}" --sequential-batches "$((edits / 100))" --out results/memit_sequential_answers
    elif [ "$what" = ablation ]; then
      for variant in ${VARIANTS:?VARIANTS: the hyperparameter JSON files to run}; do
        memit scale --alg MEMIT --hparams "$variant" "${chain_options[@]}" --sequential-batches 20 --no-generated-answers \
          --out "results/ablation/$(basename "$variant" .json)"
      done
    elif [ "$what" = lifelong-bf16 ]; then
      needs_bf16_units lifelong-bf16
      variant=${VARIANT:-SmolLM2-135M-Instruct-sequential}
      model=${MODEL:-default}
      out=${OUT:-results/lifelong_bf16}
      if .venv/bin/python -c "import sys; from memit.editing.methods import resolve_hparams; sys.exit(not resolve_hparams('MEMIT', sys.argv[1], None).targets_from_unedited)" "$variant"; then
        memit targets --model "$model" --hparams "$variant" --data-file "$DATA" --limit "$edits" --bf16 --target-cache "$out/.target_cache"
      fi  # target vectors from the edited model are computed by the chain, batch by batch
      lifelong=(--alg MEMIT --model "$model" --hparams "$variant" --data-file "$DATA" --num-edits 100 --bf16 --reuse-edits
        --target-cache "$out/.target_cache" --skip-generation --score-interval "$score_interval")
      memit scale "${lifelong[@]}" --sequential-batches "$quarters" --no-generated-answers --out "$out/teacher_forced"
      mkdir -p "$out/answers"
      ln -sfn ../teacher_forced/.edit_cache "$out/answers/.edit_cache"
      memit scale "${lifelong[@]}" --sequential-batches "$((edits / 100))" --out "$out/answers"
    else
      for alg in MEMIT AlphaEdit ROME; do
        memit scale --alg "$alg" --data-file "$DATA" --num-edits 100 --sequential-batches 5,10,15,20 \
          --generation-interval 5 --reuse-edits --use-cache --out results/paper_sequential
      done
      # AlphaEdit with its paper's ridge (docs/results/scaling.md: why AlphaEdit trails MEMIT here)
      memit scale --alg AlphaEdit --hparams docs/evaluation/AlphaEdit_SmolLM2-135M-Instruct_ridge10.json --data-file "$DATA" \
        --num-edits 100 --sequential-batches 5,10,15,20 --generation-interval 5 --reuse-edits --use-cache --out results/alphaedit_probe
    fi
  done
done
