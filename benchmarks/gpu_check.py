"""GPU check: edit CounterFact cases on each model in bfloat16 on a CUDA device and print what
a user would ask first: seconds per request, statistics tokens per second, peak GPU memory,
and the three success rates before and after. Fails loudly (exit 1) on any device mismatch:
an error about tensors on different devices, a parameter that changed device, or a delta
left on another device than its weight.

    python benchmarks/gpu_check.py --model default --model /path/to/larger.gguf [--requests 100]

Runs on the CPU too (``--device cpu --requests 2``), as a smoke test of the script itself.
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from memit import ModelLayout, edit_model, load_model
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import load_cases
from memit.evaluation.datasets.counterfact import evaluate_counterfact_case
from memit.stats import SecondMomentCache, collect_second_moments, load_corpus

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))
log = logging.getLogger("gpu_check")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="repeatable (default: default)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--counterfact", default=str(DATA / "counterfact_subset400.json"))
    p.add_argument("--corpus", default="wikipedia-sample")
    p.add_argument("--stats-samples", type=int, default=None, help="corpus samples (default: the preset's)")
    p.add_argument("--hparams", default=None, help="hyperparameters for every model (default: each model's preset)")
    return p.parse_args()


def success(model, tok, cases) -> dict[str, float]:
    per_case = [evaluate_counterfact_case(model, tok, case) for case in cases]
    return {k: statistics.fmean(m[f"{k}_success"] for m in per_case) for k in ("efficacy", "paraphrase", "neighborhood")}


def peak_gpu_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def check_model(name: str, args: argparse.Namespace, cases) -> dict[str, Any]:
    model, tok = load_model(name, dtype=args.dtype, device=args.device)
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    placement = {n: p.device for n, p in model.named_parameters()}
    hparams = resolve_hparams("MEMIT", args.hparams, model)
    if args.stats_samples:
        hparams = dataclasses.replace(hparams, mom2_n_samples=args.stats_samples)
    layout = ModelLayout.from_model(model)
    corpus = load_corpus(args.corpus)
    params_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    result: dict[str, Any] = {"model": name, "device": str(device), "dtype": str(model.dtype), "params_gib": params_gib}

    start = time.perf_counter()
    _, tokens = collect_second_moments(model, tok, layout, hparams.layers, corpus.texts(), 200, hparams.mom2_max_tokens or 256)
    result["stats_tokens_per_s"] = tokens / (time.perf_counter() - start)
    # The edit's own statistics (the preset's sample count), computed or read before the edit is timed.
    SecondMomentCache().get(model, tok, layout, hparams.layers, corpus, hparams.mom2_n_samples, hparams.mom2_max_tokens, hparams.mom2_dtype)
    result |= {f"unedited_{k}": v for k, v in success(model, tok, cases).items()}
    start = time.perf_counter()
    deltas = edit_model(model, tok, [c.request for c in cases], hparams, corpus=args.corpus)
    result["s_per_request"] = (time.perf_counter() - start) / len(cases)
    result |= {f"edited_{k}": v for k, v in success(model, tok, cases).items()}
    moved = [n for n, p in model.named_parameters() if p.device != placement[n]]
    stray = [n for n, d in deltas.deltas.items() if d.device.type != model.get_parameter(n).device.type]
    if moved or stray:
        raise RuntimeError(f"device mismatch: parameters moved {moved[:3]}, deltas away from their weights {stray[:3]}")
    result["peak_gpu_gib"] = peak_gpu_gib(device)
    deltas.revert(model)
    return result


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cases = load_cases("cf", args.counterfact, limit=args.requests)[2]
    results = []
    for name in args.model or ["default"]:
        try:
            r = check_model(name, args, cases)
        except RuntimeError as err:
            if "device" in str(err):
                print(f"FAIL {name}: {err}", file=sys.stderr)
                return 1
            raise
        results.append(r)
        print(
            f"{r['model']} on {r['device']} ({r['dtype']}, {r['params_gib']:.2f} GiB): {r['s_per_request']:.2f} s/request, "
            f"statistics {r['stats_tokens_per_s']:.0f} tokens/s, peak GPU memory {r['peak_gpu_gib'] or 0:.2f} GiB; efficacy/paraphrase/neighborhood "
            f"{r['unedited_efficacy']:.2f}/{r['unedited_paraphrase']:.2f}/{r['unedited_neighborhood']:.2f} -> "
            f"{r['edited_efficacy']:.2f}/{r['edited_paraphrase']:.2f}/{r['edited_neighborhood']:.2f}",
            flush=True,
        )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
