"""Memory: peak resident memory (and peak GPU memory where there is one) of loading a model,
computing its key statistics, and a MEMIT edit of CounterFact requests.

    python benchmarks/memory.py [--model default|PATH.gguf|FOLDER|HUB_ID] [--requests 100] [--stats-samples 200]
                                [--device cpu] [--dtype auto] [--stats-batch-tokens 8192] [--threads 1]

Each phase runs in a fresh child process (a process's peak only grows): ``load`` loads the
model; ``stats`` loads it, resets the peak (``/proc/self/clear_refs``) and computes the key
statistics of the edit layers from ``--stats-samples`` corpus samples into an empty temporary
folder (so they really are computed); ``edit`` loads the model, prepares the context
templates, resets the peak and edits ``--requests`` CounterFact requests with MEMIT, reading
the statistics the ``stats`` phase wrote. Peaks are the kernel's high-water mark of the
process's resident memory (VmHWM; ``getrusage`` where /proc is missing, without the reset),
and ``torch.cuda.max_memory_allocated`` on a GPU.

The weights are read once right after loading (a memory-mapped
safetensors load makes pages resident only when read), so "the loaded model" is all of it.
The edit's peak above the loaded model is compared with its target: the edited layers'
weights twice over (the originals kept for revert and the deltas, float32) plus what the
edit computes with, which the output names: the key statistics of the edit layers (held
for the solve, and the solve's float64 system and LU copies) and the rest (activations of
the target-vector optimisation, keys, allocator slack). The last line printed is one JSON
object. Not part of the test suite.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))
MB = 1e6


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default, a .gguf file, a model folder or a hub id")
    p.add_argument("--device", default=None, help="load_model's device (cpu, cuda, auto; default: load_model's default)")
    p.add_argument("--dtype", default=None, help="load_model's dtype (auto, float32, bfloat16, float16)")
    p.add_argument("--hparams", default=None, help="MEMIT hyperparameters (default: the model's preset, else the default model's)")
    p.add_argument("--requests", type=int, default=100, help="CounterFact requests edited at once")
    p.add_argument("--counterfact", default=str(DATA / "counterfact_subset400.json"))
    p.add_argument("--corpus", default=os.environ.get("MEMIT_CORPUS", "wikipedia-sample"), help="statistics corpus")
    p.add_argument("--stats-samples", type=int, default=200, help="corpus samples of the statistics (computed afresh)")
    p.add_argument("--stats-batch-tokens", type=int, default=None, help="tokens per statistics forward pass (default: EditOptions')")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--phase", choices=["load", "stats", "edit"], help=argparse.SUPPRESS)
    p.add_argument("--stats-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- process memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss() -> int:
    """Resident bytes now."""
    kb = _status_kb("VmRSS")
    if kb is None:
        import psutil

        return psutil.Process().memory_info().rss
    return kb * 1024


def peak_rss() -> int:
    """The process's resident high-water mark in bytes (since the last reset_peak)."""
    kb = _status_kb("VmHWM")
    if kb is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return kb * 1024


def reset_peak() -> bool:
    """Reset the resident high-water mark to the current resident size (Linux)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Gpu:
    """Peak allocated GPU memory, where there is a CUDA device."""

    def __init__(self, torch):
        self.torch = torch
        self.on = torch.cuda.is_available()

    def reset(self) -> int | None:
        if not self.on:
            return None
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        return self.torch.cuda.memory_allocated()

    def peak(self) -> int | None:
        if not self.on:
            return None
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated()


# ---------------------------------------------------------------- one phase (child process)


def load(args: argparse.Namespace):
    from memit import load_model

    params = inspect.signature(load_model).parameters
    kwargs, moved = {}, None
    for name in ("device", "dtype"):
        value = getattr(args, name)
        if value is None:
            continue
        if name in params:
            kwargs[name] = value
        elif name == "device":
            moved = value  # an older load_model without device=: move the model after loading
        else:
            print(f"note: this load_model has no dtype=; --dtype {value} ignored", file=sys.stderr)
    model, tok = load_model(args.model, **kwargs)
    if moved is not None:
        model.to(moved)
    # Weights loaded from safetensors may be memory-mapped, resident only once read: read them
    # all now, so that the loaded model's resident size is all of it and no later phase counts
    # the weights paging in.
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()
    return model, tok


def memit_hparams(args: argparse.Namespace, model):
    from memit import ModelLayout
    from memit.editing.hparams import HyperParamsError
    from memit.editing.methods import resolve_hparams
    from memit.models.loading import DEFAULT_MODEL_NAME

    try:
        hparams = resolve_hparams("MEMIT", args.hparams, model)
        source = args.hparams or "the model's preset"
    except HyperParamsError:
        if args.hparams is not None:
            raise
        hparams = resolve_hparams("MEMIT", DEFAULT_MODEL_NAME, model)
        source = f"{DEFAULT_MODEL_NAME}'s preset (no MEMIT preset for this model)"
    ModelLayout.from_model(model, hparams.layer_module_tmp, hparams.rewrite_module_tmp).check_layers(hparams.layers)
    hparams.mom2_n_samples = args.stats_samples
    return hparams, source


def sizes(model, hparams) -> dict[str, Any]:
    from memit import ModelLayout

    layout = ModelLayout.from_model(model, hparams.layer_module_tmp, hparams.rewrite_module_tmp)
    weights = [layout.mlp_out(model, layer).weight for layer in hparams.layers]
    # The keys are the inputs of the MLP output projection, which writes the hidden size.
    key_dim = int(weights[0].numel() // model.config.hidden_size)
    return {
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "layers": list(hparams.layers),
        "key_dim": key_dim,
        "edited_weight_bytes": sum(w.numel() * w.element_size() for w in weights),
        "edited_delta_bytes": sum(w.numel() * 4 for w in weights),
    }


def run_phase(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = Gpu(torch)
    result: dict[str, Any] = {"phase": args.phase, "imports_rss": rss()}
    start = time.perf_counter()
    model, tok = load(args)
    result["load_s"] = time.perf_counter() - start
    hparams, source = memit_hparams(args, model)
    result.update(sizes(model, hparams), hparams_source=source, loaded_rss=rss(), load_peak_rss=peak_rss(), gpu_loaded=gpu.reset())
    if args.phase == "load":
        result["load_gpu_peak"] = gpu.peak()
        return result

    from memit import EditOptions, ModelLayout, edit_model
    from memit.stats import SecondMomentCache, load_corpus

    options = EditOptions(stats_dir=args.stats_dir)
    if args.stats_batch_tokens:
        options.stats_batch_tokens = args.stats_batch_tokens
    result["stats_batch_tokens"] = options.stats_batch_tokens
    layout = ModelLayout.from_model(model, hparams.layer_module_tmp, hparams.rewrite_module_tmp)

    def files() -> list[Path]:
        return sorted(Path(args.stats_dir).rglob("*.safetensors"))

    if args.phase == "stats":
        if files():
            raise SystemExit(f"{args.stats_dir} already holds statistics; the stats phase needs an empty folder")
        corpus = load_corpus(args.corpus)
        result["reset"] = reset_peak()
        result["baseline_rss"], result["gpu_baseline"] = rss(), gpu.reset()
        start = time.perf_counter()
        moments = SecondMomentCache(args.stats_dir).get(
            model, tok, layout, hparams.layers, corpus, hparams.mom2_n_samples, hparams.mom2_max_tokens, hparams.mom2_dtype,
            batch_tokens=options.stats_batch_tokens,
        )
        result["stats_s"] = time.perf_counter() - start
        result["peak_rss"], result["gpu_peak"] = peak_rss(), gpu.peak()
        result["stats_files"] = len(files())
        result["stats_bytes"] = sum(m.numel() * m.element_size() for m in moments.values())
        return result

    # edit
    from memit.editing.context import get_context_templates
    from memit.evaluation.datasets import load_cases

    if len(files()) < len(hparams.layers):
        raise SystemExit(f"{args.stats_dir} holds no statistics: run the stats phase first")
    cases = load_cases("cf", args.counterfact, limit=args.requests)[2]
    requests = [c.request for c in cases]
    get_context_templates(model, tok, hparams.context_template_length_params)  # cached on disk
    result["reset"] = reset_peak()
    result["baseline_rss"], result["gpu_baseline"] = rss(), gpu.reset()
    start = time.perf_counter()
    deltas = edit_model(model, tok, requests, hparams, options=options)
    result["edit_s"] = time.perf_counter() - start
    result["peak_rss"], result["gpu_peak"] = peak_rss(), gpu.peak()
    result["requests"] = len(requests)
    gc.collect()
    try:  # hand freed heap back to the system (glibc), so that what stays resident is what is held
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    result["after_rss"] = rss()
    result["held_originals_bytes"] = sum(t.numel() * t.element_size() for t in deltas.original_weights().values())
    result["held_deltas_bytes"] = sum(t.numel() * t.element_size() for t in deltas.deltas.values())
    return result


# ---------------------------------------------------------------- driver (parent process)


def child(argv: list[str], phase: str, stats_dir: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--phase", phase, "--stats-dir", stats_dir]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {phase} phase failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / MB:,.1f} MB"


def main() -> None:
    args = parse_args()
    if args.phase:
        print(json.dumps(run_phase(args)), flush=True)
        return
    argv = sys.argv[1:]
    stats_dir = tempfile.mkdtemp(prefix="memit-memory-stats-")
    result: dict[str, Any] = {"model": args.model, "load_average_before": os.getloadavg()[0], "cpus": os.cpu_count()}
    try:
        loaded = child(argv, "load", stats_dir)
        print(f"model {args.model}: {loaded['params']:,} parameters, {mb(loaded['param_bytes'])} ({loaded['dtype']} on {loaded['device']})")
        print(f"edited layers {loaded['layers']} ({loaded['hparams_source']}): MLP output projections "
              f"{mb(loaded['edited_weight_bytes'])}, keys of width {loaded['key_dim']}")
        print(f"load:  peak RSS {mb(loaded['load_peak_rss'])} (after imports {mb(loaded['imports_rss'])}; loaded {mb(loaded['loaded_rss'])}) "
              f"in {loaded['load_s']:.1f} s; GPU peak {mb(loaded['load_gpu_peak'])}", flush=True)
        stats = child(argv, "stats", stats_dir)
        print(f"stats: peak RSS {mb(stats['peak_rss'])}, {mb(stats['peak_rss'] - stats['baseline_rss'])} above the loaded model "
              f"({args.stats_samples} samples, {stats['stats_batch_tokens']} tokens a batch, {stats['stats_s']:.1f} s); GPU peak above "
              f"loaded {mb(None if stats['gpu_peak'] is None else stats['gpu_peak'] - stats['gpu_baseline'])}", flush=True)
        edit = child(argv, "edit", stats_dir)
    finally:
        shutil.rmtree(stats_dir, ignore_errors=True)
    result["load_average_after"] = os.getloadavg()[0]

    n_layers, d = len(loaded["layers"]), loaded["key_dim"]
    dtype_bytes = 4  # mom2_dtype float32 (the presets')
    stats_held = n_layers * d * d * dtype_bytes
    # solve_update: one float64 system matrix built in place, and the solve's LU copy.
    solve_temp = 2 * d * d * 8
    edit_above = edit["peak_rss"] - edit["baseline_rss"]
    weights_twice = loaded["edited_weight_bytes"] + loaded["edited_delta_bytes"]
    rest = edit_above - weights_twice - stats_held - solve_temp
    result.update(
        model_dtype=loaded["dtype"], device=loaded["device"], hparams=loaded["hparams_source"], layers=loaded["layers"],
        key_dim=d, params=loaded["params"], model_param_bytes=loaded["param_bytes"],
        edited_weight_bytes=loaded["edited_weight_bytes"], edited_delta_bytes=loaded["edited_delta_bytes"],
        imports_rss=loaded["imports_rss"], load_peak_rss=loaded["load_peak_rss"], loaded_rss=loaded["loaded_rss"], load_s=loaded["load_s"],
        load_gpu_peak=loaded["load_gpu_peak"],
        stats_samples=args.stats_samples, stats_batch_tokens=stats["stats_batch_tokens"], stats_s=stats["stats_s"],
        stats_baseline_rss=stats["baseline_rss"], stats_peak_rss=stats["peak_rss"], stats_peak_above_loaded=stats["peak_rss"] - stats["baseline_rss"],
        stats_gpu_peak=stats["gpu_peak"], stats_gpu_peak_above_loaded=None if stats["gpu_peak"] is None else stats["gpu_peak"] - stats["gpu_baseline"],
        requests=edit["requests"], edit_s=edit["edit_s"], edit_baseline_rss=edit["baseline_rss"], edit_peak_rss=edit["peak_rss"],
        edit_peak_above_loaded=edit_above, edit_after_rss=edit["after_rss"],
        edit_gpu_peak=edit["gpu_peak"], edit_gpu_peak_above_loaded=None if edit["gpu_peak"] is None else edit["gpu_peak"] - edit["gpu_baseline"],
        held_originals_bytes=edit["held_originals_bytes"], held_deltas_bytes=edit["held_deltas_bytes"],
        target_weights_twice=weights_twice, edit_stats_held=stats_held, edit_solve_temp=solve_temp, edit_rest=rest,
        peak_reset=bool(stats["reset"] and edit["reset"]),
    )

    print(f"edit:  peak RSS {mb(edit['peak_rss'])}, {mb(edit_above)} above the loaded model ({edit['requests']} requests, "
          f"{edit['edit_s']:.1f} s); GPU peak above loaded {mb(result['edit_gpu_peak_above_loaded'])}; "
          f"held after: originals {mb(edit['held_originals_bytes'])} + deltas {mb(edit['held_deltas_bytes'])}, "
          f"resident {mb(edit['after_rss'] - edit['baseline_rss'])} above the loaded model")
    print("edit peak above the loaded model vs the target (edited weights twice over plus what the edit computes with):")
    print(f"  edited weights twice over (originals {mb(loaded['edited_weight_bytes'])} + float32 deltas {mb(loaded['edited_delta_bytes'])}) "
          f"{mb(weights_twice)}")
    print(f"  key statistics of the {n_layers} edit layers held for the solve ({n_layers} x {d}^2 x 4 B) {mb(stats_held)}, "
          f"the solve's float64 system + LU (2 x {d}^2 x 8 B) {mb(solve_temp)}")
    print(f"  the rest (activations of the target optimisation, keys, allocator slack) {mb(rest)}")
    print(f"  = {mb(edit_above)}: {edit_above / weights_twice:.1f}x the edited weights twice over; "
          f"{'within' if rest >= 0 else 'below'} weights x2 + statistics with {mb(max(rest, 0))} of activations")
    print(f"load average {result['load_average_before']:.2f} before, {result['load_average_after']:.2f} after ({result['cpus']} CPUs)")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
