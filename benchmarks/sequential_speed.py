"""Sequential editing speed and success: today's MEMIT chain against the sequential preset.

    python benchmarks/sequential_speed.py [--batches 3] [--batch 16] [--threads 2] [--stop-margins 0.7,2]

In one process on one model: edit chains over the same CounterFact cases (``--batches``
batches of ``--batch`` requests, each batch on top of the ones before), one with the
model's MEMIT preset (the paper's MEMIT: loss-based early stop, earlier edits ignored),
one with its sequential preset (stop once the target is the most probable token, earlier
edits' keys preserved, targets from the unedited model), and one more for each
``--stop-margins`` value: the sequential preset stopping once the target leads every other
token by that many nats. No target-vector cache: every vector is optimised. Reports the
target-vector seconds per request of each chain, each one's speed-up over the MEMIT preset,
and the efficacy / paraphrase / neighborhood success of all the chain's edits after its last
batch. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from edit_speed import success_rates  # the paper's success rates, as `memit evaluate` computes them
from memit import EditChain, load_model
from memit.editing.base import EditOptions
from memit.editing.common import second_moments
from memit.editing.hparams import preset_name_for
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import CounterFactCase, load_cases
from memit.models import ModelLayout
from memit.stats import resolve_corpus

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--counterfact", default=str(DATA / "counterfact_subset400.json"))
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="requests per batch")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--stop-margins", default="", help="comma-separated z_stop_margin values (nats): one more sequential chain each")
    return p.parse_args()


def success_percent(model, tok, cases: list[CounterFactCase]) -> dict[str, float]:
    return {kind: 100 * rate for kind, rate in success_rates(model, tok, cases).items()}


def warm_statistics(model, tok, hparams) -> None:
    """Compute (or load) the key statistics before any chain, so that no chain's time has them."""
    corpus = resolve_corpus(None, hparams.mom2_dataset, model, tok)
    second_moments(model, tok, ModelLayout.from_model(model), hparams, hparams.layers, corpus, EditOptions())


def run_chain(model, tok, hparams, cases: list[CounterFactCase], batch: int) -> dict[str, Any]:
    chain = EditChain.start(model, tok, "MEMIT", hparams)
    target_seconds, start = 0.0, time.perf_counter()
    try:
        for i in range(0, len(cases), batch):
            deltas = chain.edit([c.request for c in cases[i : i + batch]])
            target_seconds += deltas.timings["target_vectors"]
        seconds = time.perf_counter() - start
        rates = success_percent(model, tok, cases)
    finally:
        chain.revert()
    n = len(cases)
    return {"z_s_per_request": target_seconds / n, "s_per_request": seconds / n, **rates}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    preset = preset_name_for(args.model)
    sequential = resolve_hparams("MEMIT", f"{preset}-sequential", model)
    configs = {"MEMIT preset": resolve_hparams("MEMIT", preset, model), "sequential preset": sequential}
    for margin in filter(None, args.stop_margins.split(",")):
        configs[f"sequential, margin {float(margin):g}"] = dataclasses.replace(sequential, z_stop_margin=float(margin))
    for hparams in configs.values():
        warm_statistics(model, tok, hparams)
    cases = load_cases("cf", args.counterfact, limit=args.batches * args.batch)[2]
    unedited = success_percent(model, tok, cases)
    results = {name: run_chain(model, tok, hp, cases, args.batch) for name, hp in configs.items()}
    speedups = {name: results["MEMIT preset"]["z_s_per_request"] / r["z_s_per_request"] for name, r in results.items() if name != "MEMIT preset"}
    print(f"{args.batches} batches of {args.batch} requests, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'chain':<26} {'z s/request':>12} {'s/request':>10} {'efficacy':>9} {'paraphrase':>11} {'neighborhood':>13}")
    print(f"{'unedited':<26} {'':>12} {'':>10} {unedited['efficacy']:9.1f} {unedited['paraphrase']:11.1f} {unedited['neighborhood']:13.1f}")
    for name, r in results.items():
        print(f"{name:<26} {r['z_s_per_request']:12.2f} {r['s_per_request']:10.2f} {r['efficacy']:9.1f} {r['paraphrase']:11.1f} {r['neighborhood']:13.1f}")
    for name, speedup in speedups.items():
        print(f"target vectors per request: {speedup:.2f}x faster with the {name}")
    print(json.dumps({"batches": args.batches, "batch": args.batch, "threads": torch.get_num_threads(), "unedited": unedited,
                      "chains": results, "z_speedup": speedups}))


if __name__ == "__main__":
    main()
