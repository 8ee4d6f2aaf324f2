"""Fluency texts with --generation-interval: decoded per 48-case chunk against in full batches.

    python benchmarks/fluency_speed.py [--cases 240] [--interval 10] [--threads 1] [--model default]

With fluency on every N-th case, a chunk of 48 cases holds about 96/N generation prompts, and
on a CPU a decoding step reads every weight however few rows it has. The reference decodes
the texts chunk by chunk (as the runner did before); memit's way gathers the prompts of
consecutive chunks into one decoding batch (``_text_chunks``). Both decode the same cases'
100-token texts on the unedited model; the benchmark checks the texts are identical, then
prints seconds per case (of all cases, not only those with texts) and the speed-up. The last
line printed is one JSON object. Time it alone on the machine.
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
from memit.evaluation.scoring import CASES_PER_CHUNK, GenerationResources, Scoring, _generated_texts, _text_chunks, in_groups

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--cases", type=int, default=240)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data-file", default=str(DATA / "counterfact_mend" / "counterfact-edit.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    cases = load_cases(None, args.data_file, limit=args.cases)[2]
    scoring = Scoring(generation=GenerationResources(), generation_cases=frozenset(c.case_id for c in cases[:: args.interval]))
    chunkings = {"reference": in_groups(cases, CASES_PER_CHUNK), "memit": list(_text_chunks(cases, scoring, None))}
    timings, texts = {}, {}
    for name, chunks in chunkings.items():
        start = time.perf_counter()
        texts[name] = {k: v for chunk in chunks for k, v in _generated_texts(model, tok, chunk, scoring, None).items()}
        timings[name] = (time.perf_counter() - start) / len(cases)
    differing = sum(texts["reference"][k] != texts["memit"].get(k) for k in texts["reference"])
    report = {
        "model": args.model, "cases": len(cases), "interval": args.interval, "texts": 2 * len(texts["reference"]),
        "threads": torch.get_num_threads(), "reference_s_per_case": round(timings["reference"], 3),
        "memit_s_per_case": round(timings["memit"], 3), "speedup": round(timings["reference"] / timings["memit"], 2),
        "cases_differing": differing,
    }
    print(f"reference (texts decoded per {CASES_PER_CHUNK}-case chunk): {report['reference_s_per_case']} s per case")
    print(f"memit (texts of up to {len(max(chunkings['memit'], key=len))} cases in one batch): {report['memit_s_per_case']} s per case")
    print(f"speed-up {report['speedup']}x; cases whose texts differ: {differing}")
    if differing:
        raise SystemExit("the two ways disagree")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
