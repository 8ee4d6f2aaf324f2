"""Edit speed: the reference one-request-at-a-time MEMIT against the fast path.

    python benchmarks/edit_speed.py [--requests 64] [--stats-samples 200] [--bf16] [--threads 1]

In one run on one model: measures matmul throughput; times key-statistics collection in one
pass over all edit layers against one pass per layer (each stopping after its layer, as the
paper's code does) on the same corpus samples; then edits the same CounterFact requests with
the reference path (``EditOptions(batch_size=1, fast=False)``: the whole model at every step,
one request at a time) and the fast path, each from the unedited model, and scores
efficacy / paraphrase / neighborhood success the paper's way (mean per-token NLL of the new
against the true target). Both edits read the same cached statistics, so they solve with the
same C; the statistics time is reported separately. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from memit import EditOptions, MEMITHyperParams, ModelLayout, edit_model, load_model
from memit.editing.context import get_context_templates
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import CounterFactCase, load_cases
from memit.evaluation.datasets.counterfact import evaluate_counterfact_case
from memit.stats import SecondMomentCache, collect_second_moments, load_corpus

log = logging.getLogger("edit_speed")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="CounterFact requests edited by each path")
    p.add_argument("--model", default="default")
    p.add_argument("--counterfact", default=str(DATA / "counterfact_subset400.json"))
    p.add_argument("--corpus", default=os.environ.get("MEMIT_CORPUS", "wikipedia-sample"), help="statistics corpus (default: the packaged sample)")
    p.add_argument("--stats-samples", type=int, default=200, help="corpus samples for the statistics timing")
    p.add_argument("--stats-tokens", type=int, default=256, help="tokens per corpus sample")
    p.add_argument("--mom2-samples", type=int, default=None, help="corpus samples of the statistics the edits use (preset: 2000)")
    p.add_argument("--batch-size", type=int, default=EditOptions.batch_size, help="requests per batch on the fast path")
    p.add_argument("--bf16", action="store_true", help="also run the fast path with bfloat16 autocast")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-stats", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args()


# ---------------------------------------------------------------- throughput


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


class FlopTally:
    """Counts the matmul FLOPs the decoder layers and the vocabulary head execute (2 per
    parameter per token forward; as much again backward when the input carries a gradient,
    since only activation gradients are computed). Attention scores are left out: a few
    percent at these lengths."""

    def __init__(self, model: torch.nn.Module, layout: ModelLayout):
        self.flops = 0.0
        self.modules = [layout.layer(model, i) for i in range(layout.num_layers)] + [model.get_output_embeddings()]
        self.params = [sum(p.numel() for p in m.parameters()) for m in self.modules]

    @contextlib.contextmanager
    def counting(self) -> Iterator["FlopTally"]:
        handles = [m.register_forward_pre_hook(self._hook(n)) for m, n in zip(self.modules, self.params)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _hook(self, n_params: int):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            hidden = args[0] if args else None
            if not isinstance(hidden, torch.Tensor):
                return
            forward = 2.0 * n_params * hidden.shape[:-1].numel()
            self.flops += forward * (2 if torch.is_grad_enabled() and hidden.requires_grad else 1)

        return hook


# ---------------------------------------------------------------- statistics


def time_statistics(model, tok, layout: ModelLayout, layers: list[int], args: argparse.Namespace) -> dict[str, Any]:
    """One pass for all layers against one pass per layer, same samples, no cache."""
    corpus = load_corpus(args.corpus)

    def run(which: list[int], autocast: bool = False) -> tuple[dict[int, torch.Tensor], int, float]:
        start = time.perf_counter()
        moments, count = collect_second_moments(
            model, tok, layout, which, corpus.texts(), args.stats_samples, args.stats_tokens, autocast=autocast
        )
        return moments, count, time.perf_counter() - start

    one, count, one_s = run(layers)
    per_layer_s, max_rel = 0.0, 0.0
    for layer in layers:
        alone, _, seconds = run([layer])
        per_layer_s += seconds
        max_rel = max(max_rel, float((alone[layer] - one[layer]).norm() / one[layer].norm()))
    out = {
        "stats_tokens": count,
        "stats_one_pass_s": one_s,
        "stats_per_layer_s": per_layer_s,
        "stats_one_pass_tokens_per_s": count / one_s,
        "stats_per_layer_tokens_per_s": count / per_layer_s,
        "stats_speedup": per_layer_s / one_s,
        "stats_one_vs_per_layer_rel_diff": max_rel,
    }
    if args.bf16:
        bf, _, bf_s = run(layers, autocast=True)
        out["stats_bf16_one_pass_s"] = bf_s
        out["stats_bf16_tokens_per_s"] = count / bf_s
        out["stats_bf16_rel_diff"] = max(float((bf[layer] - one[layer]).norm() / one[layer].norm()) for layer in layers)
    return out


# ---------------------------------------------------------------- quality


def success_rates(model, tok, cases: list[CounterFactCase]) -> dict[str, float]:
    """The paper's CounterFact success rates, as `memit evaluate` computes them, averaged over cases."""
    per_case = [evaluate_counterfact_case(model, tok, case) for case in cases]
    return {kind: statistics.fmean(m[f"{kind}_success"] for m in per_case) for kind in ("efficacy", "paraphrase", "neighborhood")}


# ---------------------------------------------------------------- edits


def timed_edit(model, tok, cases: list[CounterFactCase], hparams: MEMITHyperParams, options: EditOptions, tally: FlopTally) -> dict[str, Any]:
    """Edit, score, and revert; the time of the target-vector optimisation is measured apart."""
    tally.flops = 0.0
    with tally.counting():
        start = time.perf_counter()
        deltas = edit_model(model, tok, [c.request for c in cases], hparams, options=options)
        seconds = time.perf_counter() - start
    z_seconds = deltas.timings["target_vectors"]
    z_flops = tally.flops
    rates = success_rates(model, tok, cases)
    deltas.revert(model)
    n = len(cases)
    return {
        "s_per_request": seconds / n,
        "z_s_per_request": z_seconds / n,
        "z_gflops": z_flops / z_seconds / 1e9 if z_seconds else 0.0,
        **rates,
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("memit").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["MEMIT_CORPUS"] = args.corpus  # the corpus the edits' statistics come from
    torch.manual_seed(0)

    model, tok = load_model(args.model)
    hparams = copy.deepcopy(resolve_hparams("MEMIT", None, model))
    if args.mom2_samples:
        hparams.mom2_n_samples = args.mom2_samples
    layout = ModelLayout.from_model(model)
    cases = load_cases("cf", args.counterfact, limit=args.requests)[2]

    result: dict[str, Any] = {
        "model": args.model,
        "requests": len(cases),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_average": os.getloadavg()[0],
    }
    log.info("matmul throughput")
    result["matmul_fp32_gflops"] = matmul_gflops(torch.float32)
    result["matmul_bf16_gflops"] = matmul_gflops(torch.bfloat16)
    print(f"matmul 2048x2048: float32 {result['matmul_fp32_gflops']:.0f} GFLOP/s, bfloat16 {result['matmul_bf16_gflops']:.0f} GFLOP/s", flush=True)

    if not args.skip_stats:
        log.info("statistics: one pass over layers %s against one pass per layer", hparams.layers)
        result.update(time_statistics(model, tok, layout, hparams.layers, args))
        print(
            f"statistics ({result['stats_tokens']} tokens, layers {hparams.layers}): one pass "
            f"{result['stats_one_pass_s']:.1f} s = {result['stats_one_pass_tokens_per_s']:.0f} tokens/s; per-layer passes "
            f"{result['stats_per_layer_s']:.1f} s = {result['stats_per_layer_tokens_per_s']:.0f} tokens/s; "
            f"speedup {result['stats_speedup']:.2f}x (relative difference {result['stats_one_vs_per_layer_rel_diff']:.1e})",
            flush=True,
        )
        if args.bf16:
            print(f"statistics with bf16 autocast: {result['stats_bf16_tokens_per_s']:.0f} tokens/s, "
                  f"relative difference {result['stats_bf16_rel_diff']:.1e}", flush=True)

    # The statistics the edits solve with, computed (or read from the cache) before any timing.
    log.info("statistics for the edits (%d samples, cached)", hparams.mom2_n_samples)
    start = time.perf_counter()
    for autocast in (False, True) if args.bf16 else (False,):
        SecondMomentCache().get(
            model, tok, layout, hparams.layers, load_corpus(args.corpus), hparams.mom2_n_samples,
            hparams.mom2_max_tokens, hparams.mom2_dtype, autocast=autocast,
        )
    result["edit_stats_s"] = time.perf_counter() - start
    get_context_templates(model, tok, hparams.context_template_length_params)

    log.info("unedited model")
    result.update({f"unedited_{k}": v for k, v in success_rates(model, tok, cases).items()})
    tally = FlopTally(model, layout)
    runs: dict[str, EditOptions] = {}
    if not args.skip_reference:
        runs["reference"] = EditOptions(batch_size=1, fast=False)
    runs["fast"] = EditOptions(batch_size=args.batch_size, fast=True)
    if args.bf16:
        runs["fast_bf16"] = EditOptions(batch_size=args.batch_size, fast=True, autocast=True)
    for name, options in runs.items():
        log.info("%s path: %d requests (batch_size=%d, fast=%s, autocast=%s)", name, len(cases), options.batch_size, options.fast, options.autocast)
        # Other processes may share the CPU: the throughput and load right before each run say how much.
        result[f"{name}_matmul_fp32_gflops"] = matmul_gflops(torch.float32, seconds=1.0)
        result[f"{name}_load_average"] = os.getloadavg()[0]
        run = timed_edit(model, tok, cases, hparams, options, tally)
        for key, value in run.items():
            result[f"{name}_{key}"] = value
        print(
            f"{name:>10}: {run['s_per_request']:.2f} s/request (target vectors {run['z_s_per_request']:.2f} s/request at "
            f"{run['z_gflops']:.1f} GFLOP/s = {run['z_gflops'] / result[f'{name}_matmul_fp32_gflops']:.0%} of the fp32 matmul "
            f"measured just before, {result[f'{name}_matmul_fp32_gflops']:.0f} GFLOP/s); "
            f"efficacy {run['efficacy']:.3f} paraphrase {run['paraphrase']:.3f} neighborhood {run['neighborhood']:.3f}",
            flush=True,
        )
    print(f"  unedited: efficacy {result['unedited_efficacy']:.3f} paraphrase {result['unedited_paraphrase']:.3f} "
          f"neighborhood {result['unedited_neighborhood']:.3f}")
    if "reference_s_per_request" in result:
        result["speedup"] = result["reference_s_per_request"] / result["fast_s_per_request"]
        result["z_speedup"] = result["reference_z_s_per_request"] / result["fast_z_s_per_request"]
        print(f"speedup per request: {result['speedup']:.2f}x (target vectors alone {result['z_speedup']:.2f}x)")
        if args.bf16:
            result["speedup_bf16"] = result["reference_s_per_request"] / result["fast_bf16_s_per_request"]
            print(f"speedup per request with bf16 autocast: {result['speedup_bf16']:.2f}x")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
