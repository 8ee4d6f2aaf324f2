"""Scoring speed: CounterFact cases scored the paper's way against memit's way, in one run.

    python benchmarks/scoring_speed.py [--cases 48] [--threads 1] [--model default]

The paper's way (the reference): each case on its own, every prompt + target as one sequence,
the vocabulary head at every position. memit's way: cases in chunks of 48 (as the evaluation
runner scores them), each distinct prompt run once with its keys and values reused for both
targets, prompts batched by length, the vocabulary head only where read. Both score the same
cases on the same unedited model; the benchmark checks that every (prompt, target) NLL
agrees within 1e-3 and every success decision (NLL of the true against the new target) is
the same, then prints seconds per case and the
speed-up. The last line printed is one JSON object. Time it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from memit import load_model
from memit.evaluation.datasets import load_cases
from memit.evaluation.datasets.counterfact import counterfact_pairs
from memit.evaluation.scoring import CASES_PER_CHUNK
from memit.predict import prefetched_scores, score_continuations
from memit.utils.devices import device_label

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def reference(model, tok, cases) -> list[float]:
    """Mean NLL of every (prompt, target) pair: one case at a time, joined sequences."""
    nlls = []
    for case in cases:
        pairs = counterfact_pairs(case)
        nlls += [s.mean_nll for s in score_continuations(model, tok, [p for p, _ in pairs], [c for _, c in pairs], shared_prompts=False)]
    return nlls


def memit_way(model, tok, cases) -> list[float]:
    """The same through the evaluation's path: chunks of cases prefetched together."""
    nlls = []
    for start in range(0, len(cases), CASES_PER_CHUNK):
        chunk = cases[start : start + CASES_PER_CHUNK]
        pairs = [p for c in chunk for p in counterfact_pairs(c)]
        with prefetched_scores(model, tok, list(dict.fromkeys(pairs))):
            for case in chunk:
                case_pairs = counterfact_pairs(case)
                nlls += [s.mean_nll for s in score_continuations(model, tok, [p for p, _ in case_pairs], [c for _, c in case_pairs])]
    return nlls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--cases", type=int, default=48)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-file", default=str(DATA / "counterfact_subset400.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    cases = load_cases(None, args.data_file, limit=args.cases)[2]
    memit_way(model, tok, cases[:2])  # warm-up
    timings, results = {}, {}
    for name, run in (("reference", reference), ("memit", memit_way)):
        start = time.perf_counter()
        results[name] = run(model, tok, cases)
        timings[name] = (time.perf_counter() - start) / len(cases)
    ref, new = results["reference"], results["memit"]
    worst = max(abs(a - b) for a, b in zip(ref, new))
    # Pairs come as (target_new, target_true) per prompt: a success decision compares the two.
    decisions = sum((ref[i + 1] > ref[i]) != (new[i + 1] > new[i]) for i in range(0, len(ref), 2))
    report = {
        "model": args.model, "device": device_label(model), "cases": len(cases), "threads": torch.get_num_threads(),
        "reference_s_per_case": round(timings["reference"], 3), "memit_s_per_case": round(timings["memit"], 3),
        "speedup": round(timings["reference"] / timings["memit"], 2), "max_nll_difference": worst, "success_decisions_differing": decisions,
    }
    print(f"reference (one case at a time, joined sequences): {report['reference_s_per_case']} s per case")
    print(f"memit ({CASES_PER_CHUNK} cases together, shared prompts, head where read): {report['memit_s_per_case']} s per case")
    print(f"speed-up {report['speedup']}x; largest NLL difference {worst:.2e}; success decisions differing: {decisions}")
    if worst > 1e-3 or decisions:
        raise SystemExit("the two ways disagree")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
