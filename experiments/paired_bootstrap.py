"""Paired comparison of two CounterFact runs on the same cases: the Score difference with a
95% bootstrap interval over cases, and per metric how many cases got better or worse.

    python experiments/paired_bootstrap.py RUN_A RUN_B [--resamples 2000] [--seed 0]
"""
from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from memit.evaluation.summary import SUCCESS_KEYS as KEYS
from memit.evaluation.summary import load_case_records


def post_successes(run: Path) -> dict[object, tuple[float, ...]]:
    return {c["case_id"]: tuple(c["post"][k] for k in KEYS) for c in load_case_records(run)}


def score(runs: dict[object, tuple[float, ...]], ids: list) -> float:
    return statistics.harmonic_mean([statistics.fmean(runs[i][k] for i in ids) for k in range(len(KEYS))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    a, b = post_successes(args.run_a), post_successes(args.run_b)
    ids = sorted(set(a) & set(b), key=str)
    if not ids:
        raise SystemExit("the two runs share no case")
    rng = random.Random(args.seed)
    diffs = sorted(score(b, s) - score(a, s) for s in ([rng.choice(ids) for _ in ids] for _ in range(args.resamples)))
    low, high = diffs[int(0.025 * len(diffs))], diffs[int(0.975 * len(diffs)) - 1]
    print(f"{len(ids)} cases: Score A {100 * score(a, ids):.2f}, B {100 * score(b, ids):.2f}, "
          f"B - A {100 * (score(b, ids) - score(a, ids)):+.2f} (95% interval [{100 * low:+.2f}, {100 * high:+.2f}])")
    for k, key in enumerate(KEYS):
        change = [b[i][k] - a[i][k] for i in ids]
        print(f"  {key}: {100 * statistics.fmean(change):+.2f} ({sum(c > 0 for c in change)} cases better, {sum(c < 0 for c in change)} worse)")


if __name__ == "__main__":
    main()
