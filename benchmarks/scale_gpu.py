"""Real-size speed and memory: MEMIT's phases on a randomly initialised model of a real shape.

    python benchmarks/scale_gpu.py --shape llama3-8b --requests 10000 --stats-samples 2000 \\
        [--device cuda] [--dtype bfloat16] [--batch-sizes 16,64,256] [--batch-size 64] \\
        [--cases 200] [--out docs/device/scale_llama3-8b.json]

Speed and memory do not depend on the weights' values, so the model is built from a real
configuration (``--shape``: ``llama3-8b``, ``gptj-6b``, ``llama-1b``, and ``tiny``, a 2-layer
Llama the tests run) with random weights, the default model's tokenizer and the packaged
Wikipedia sample. Quality on random weights means nothing: only time, throughput and memory
are reported, and every phase checks that no parameter changed device or dtype and that the
deltas sit on their weights' devices. The hyperparameters are the paper's GPT-J preset, its
edit layers kept where the model has them (the first layers otherwise).

Phases, in one process, each one JSON line (and a table at the end):

1. ``stats``: key statistics of the edit layers over ``--stats-samples`` corpus samples, into
   an empty folder (tokens/s; the forward pass stops after the last edit layer).
2. ``targets_bs<B>``: target vectors of ``min(R, 2B)`` requests at each ``--batch-sizes`` B
   (requests/s per batch size), then ``targets``: all R requests at ``--batch-size``, into a
   target cache that the edit reads.
3. ``edit``: the MEMIT edit of the R requests (keys, residuals and float64 solves, target
   vectors from the cache), with per-layer seconds for the solve and for the keys.
4. ``scoring``: the edited model's teacher-forced CounterFact metrics on ``--cases`` cases, several
   cases' prompts in shared batches as ``memit evaluate`` scores them.

Each line has the peak memory of the phase (``torch.cuda.max_memory_allocated`` on a GPU,
the process's resident high-water mark on a CPU) beside the memory model of
docs/performance.md, and the phase's floating-point work (forward passes counted per
decoder layer and token as they run, backward passes through the layers above the edit
layer, the Gram products of the statistics, the solves) divided by the device's measured
matmul rate in the model's dtype (float32 for the statistics' Gram products, float64 for the
solves): ``limit_s``, the fastest the
phase could be, and ``of_limit``, how close it came.

The last line printed is one JSON object of everything. Not part of the test suite (a test
runs the ``tiny`` shape on the CPU).
"""
from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from memit import MEMITHyperParams, ModelLayout, load_model
from memit.editing.base import EditOptions
from memit.editing.common import context_templates, layer_targets
from memit.editing.memit.main import MEMITEditor
from memit.evaluation.datasets import get_dataset, load_cases
from memit.evaluation.scoring import Scoring, evaluate_cases
from memit.models.loading import prepare_tokenizer
from memit.prompt_format import RAW
from memit.stats import SecondMomentCache, load_corpus
from memit.utils.io import atomic_path
from memory import peak_rss, reset_peak, rss  # benchmarks/memory.py, beside this script
from shapes import SHAPES  # benchmarks/shapes.py, shared with the paper's code's run

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))
log = logging.getLogger("scale_gpu")
GIB = 2**30



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--tokenizer", default=None, help="folder of the default model's tokenizer (saved with save_pretrained), "
                                                       "where the default model is not installed; default: the default model's")
    p.add_argument("--requests", type=int, default=100, help="requests edited at once (R)")
    p.add_argument("--requests-file", action="append", default=None,
                   help="CounterFact or MEND CounterFact files to draw requests from, in order (repeatable; "
                        "default: counterfact-edit.json and counterfact-train.json of the shared data)")
    p.add_argument("--stats-samples", type=int, default=2000)
    p.add_argument("--stats-max-tokens", type=int, default=None, help="tokens per corpus sample (default: the context length, at most 2,048)")
    p.add_argument("--stats-batch-tokens", type=int, default=EditOptions.stats_batch_tokens)
    p.add_argument("--batch-sizes", default="16,64", help="target-vector batch sizes timed on min(R, 2B) requests each")
    p.add_argument("--batch-size", type=int, default=64, help="target-vector batch size of the full R")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps per target vector (default: the preset's)")
    p.add_argument("--cases", type=int, default=100, help="CounterFact cases scored after the edit")
    p.add_argument("--counterfact", default=str(DATA / "counterfact_subset400.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file of every phase (written atomically)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the model and its settings


def build_model(shape: str, vocab_size: int, pad_token_id: int | None, device: str, dtype: torch.dtype) -> PreTrainedModel:
    """Random weights of a real configuration, initialised on ``device`` (an 8B model never
    passes through the CPU)."""
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=vocab_size, pad_token_id=pad_token_id, **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def paper_hparams(model: PreTrainedModel, args: argparse.Namespace) -> MEMITHyperParams:
    """The paper's GPT-J preset with module names from the architecture, its edit layers where
    the model has them and the packaged corpus."""
    hp = MEMITHyperParams.preset("EleutherAI_gpt-j-6B")
    n_layers = model.config.num_hidden_layers
    layers = [layer for layer in hp.layers if layer < n_layers] or list(range(min(len(hp.layers), n_layers)))
    changes: dict[str, Any] = dict(
        layers=layers, mom2_dataset="wikipedia-sample", mom2_n_samples=args.stats_samples,
        mom2_max_tokens=args.stats_max_tokens, rewrite_module_tmp=None, layer_module_tmp=None,
    )
    if args.steps is not None:
        changes["v_num_grad_steps"] = args.steps
    return dataclasses.replace(hp, **changes)


def load_requests(files: list[str], n: int) -> list:
    requests = []
    for file in files:
        requests += [case.request for case in load_cases(None, file)[2]]
        if len(requests) >= n:
            return requests[:n]
    raise SystemExit(f"--requests {n}: the files hold only {len(requests)} requests; add --requests-file")


# ---------------------------------------------------------------- measuring


@dataclasses.dataclass
class Sizes:
    """What the memory model and the FLOP counts need to know about the model."""

    hidden: int
    key_dim: int
    vocab: int
    n_layers: int
    layer_params: int  # matmul weights of one decoder layer
    element: int  # bytes per weight element
    weight_bytes: int

    @classmethod
    def of(cls, model: PreTrainedModel, layout: ModelLayout, layer: int) -> "Sizes":
        n_layers = model.config.num_hidden_layers
        linear = [m.weight for m in layout.layer(model, 0).modules() if isinstance(m, torch.nn.Linear)]
        out = layout.mlp_out(model, layer).weight
        return cls(
            hidden=model.config.hidden_size, key_dim=out.numel() // model.config.hidden_size,
            vocab=model.config.vocab_size, n_layers=n_layers, layer_params=sum(w.numel() for w in linear),
            element=out.element_size(), weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        )


class FlopCounter:
    """Counts the forward work as it runs: for every decoder layer and the LM head, the
    tokens that went through it (2 FLOPs per weight and token, plus causal attention's
    2·s²·hidden per sequence of length s)."""

    def __init__(self, model: PreTrainedModel, layout: ModelLayout, sizes: Sizes):
        self.sizes = sizes
        self.reset()
        self.handles = [layer.register_forward_hook(self._layer_hook(i)) for i in range(sizes.n_layers) for layer in [layout.layer(model, i)]]
        self.handles.append(model.get_output_embeddings().register_forward_hook(self._head_hook))

    def _layer_hook(self, index: int):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            batch, length = hidden.shape[0], hidden.shape[1]
            self.tokens[index] += batch * length
            self.attention[index] += 2 * batch * length * length * self.sizes.hidden
        return hook

    def _head_hook(self, _module, inputs, _output):
        self.head_tokens += inputs[0].shape[:-1].numel()

    def reset(self) -> None:
        self.tokens = [0] * self.sizes.n_layers
        self.attention = [0] * self.sizes.n_layers
        self.head_tokens = 0

    def forward_flops(self, from_layer: int = 0) -> float:
        """Forward FLOPs of the layers from ``from_layer`` up, and of the head."""
        layers = range(from_layer, self.sizes.n_layers)
        return (sum(2 * self.sizes.layer_params * self.tokens[i] + self.attention[i] for i in layers)
                + 2 * self.sizes.vocab * self.sizes.hidden * self.head_tokens)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def matmul_rate(dtype: torch.dtype, device: torch.device, rows: int, inner: int, cols: int,
                repeats: int = 5, min_seconds: float = 2.0) -> float:
    """FLOP/s of a linear layer's product in ``dtype`` on ``device``: ``rows`` inputs of width
    ``inner`` times a weight of ``cols`` rows; the best of at least ``repeats`` runs and
    ``min_seconds`` (a shared CPU's clock moves: one short measurement read half its rate)."""
    x = torch.randn(rows, inner, device=device).to(dtype)
    weight = torch.randn(cols, inner, device=device).to(dtype)
    best, runs, began = float("inf"), 0, time.perf_counter()
    torch.nn.functional.linear(x, weight)  # warms up
    while runs < repeats or time.perf_counter() - began < min_seconds:
        synchronize(device)
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        synchronize(device)
        best, runs = min(best, time.perf_counter() - start), runs + 1
    return 2 * rows * inner * cols / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one phase: allocated GPU memory on CUDA, else the process's resident
    high-water mark (reset through /proc on Linux) above its resident size before the model
    was built (the interpreter, torch and the tokenizer), so both compare with the memory
    model."""

    def __init__(self, device: torch.device, baseline: int = 0):
        self.device = device
        self.baseline = baseline if device.type != "cuda" else 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss() - self.baseline


def check_placement(model: PreTrainedModel, placement: dict[str, tuple[torch.device, torch.dtype]], deltas=None) -> None:
    """Raises if a parameter changed device or dtype, or a delta is away from its weight."""
    moved = [n for n, p in model.named_parameters() if (p.device, p.dtype) != placement[n]]
    stray = [n for n, d in (deltas or {}).items() if d.device != model.get_parameter(n).device]
    if moved or stray:
        raise RuntimeError(f"device or dtype changed: parameters {moved[:3]}, deltas away from their weights {stray[:3]}")


# ---------------------------------------------------------------- the memory model (docs/performance.md)


def stats_memory(s: Sizes, n_edit_layers: int, batch_tokens: int, sums_on_device: bool) -> int:
    """Captured keys of the edit layers per token, plus the larger of one layer's transients
    and the counting of one layer; a float32 Gram and a quarter strip of it; the float64
    sums where they stay on the device."""
    transients = 2 * s.key_dim * s.element + 12 * s.hidden
    counting = s.key_dim * 4 + s.key_dim * s.element
    per_token = n_edit_layers * s.key_dim * s.element + max(transients, counting)
    fixed = int(1.25 * s.key_dim**2 * 4) + (n_edit_layers * s.key_dim**2 * 8 if sums_on_device else 0)
    return s.weight_bytes + batch_tokens * per_token + fixed


def targets_memory(s: Sizes, layers_above: int, step_tokens: int) -> int:
    """Activations kept for the backward pass through the layers above the edit layer (the
    residual stream, attention and MLP inputs and outputs: about 6·hidden + 3·MLP width a
    token and layer) and the float32 logits with their log-softmax, for the largest step."""
    per_token = (layers_above + 1) * (6 * s.hidden + 3 * s.key_dim) * s.element + 2 * 4 * s.vocab
    return s.weight_bytes + step_tokens * per_token


def edit_memory(s: Sizes, n_edit_layers: int, requests: int, on_cpu: bool) -> int:
    """The originals and float32 deltas of the edited matrices; one layer's float64 system
    and LU copy; the float64 keys, their solved copy and the residuals; and on a CPU the key
    statistics of every edit layer in float32, which the solves read from host memory."""
    edited = n_edit_layers * s.key_dim * s.hidden * (s.element + 4)
    statistics = n_edit_layers * s.key_dim**2 * 4 if on_cpu else 0
    return (s.weight_bytes + edited + statistics + 2 * s.key_dim**2 * 8
            + 2 * requests * s.key_dim * 8 + 2 * requests * s.hidden * 8)


# ---------------------------------------------------------------- phases


@contextmanager
def phase(name: str, results: list[dict], memory: PeakMemory, device: torch.device, counter: FlopCounter) -> Iterator[dict]:
    counter.reset()
    memory.reset()
    row: dict[str, Any] = {"phase": name}
    synchronize(device)
    start = time.perf_counter()
    yield row
    synchronize(device)
    row["seconds"] = time.perf_counter() - start
    row["peak_memory_gib"] = memory.peak() / GIB
    if "predicted_memory_gib" in row:
        row["measured_over_predicted"] = row["peak_memory_gib"] / row["predicted_memory_gib"]
    if "limit_s" in row:
        row["of_limit"] = row["limit_s"] / row["seconds"]
    results.append(row)
    log.info("%s", json.dumps(row))
    print(json.dumps(row), flush=True)


def solve_flops(d: int, out: int, r: int) -> float:
    """MEMIT's float64 solve per layer: λC + KᵀK, the LU solve with R right-hand sides, R·(K…)ᵀ."""
    return 2 * r * d * d + 2 / 3 * d**3 + 2 * d * d * r + 2 * r * d * out


class TimedMEMIT(MEMITEditor):
    """MEMIT with each layer's solve timed, so that the rest of the layer's time is its keys
    and residuals."""

    solve_seconds: dict[int, float]
    layer_seconds: dict[int, float]

    def layer_solver(self, task):
        solve = super().layer_solver(task)
        self.solve_seconds, self.layer_seconds = {}, {}
        device = next(task.model.parameters()).device
        last = [time.perf_counter()]

        def timed(i, layer, keys, residual):
            synchronize(device)
            start = time.perf_counter()
            update = solve(i, layer, keys, residual)
            synchronize(device)
            end = time.perf_counter()
            self.solve_seconds[layer] = end - start
            self.layer_seconds[layer] = end - last[0]
            last[0] = end
            return update

        return timed


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.tokenizer:
        tok = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    else:
        default_model, tok = load_model("default")
        del default_model
        gc.collect()
    baseline = rss()
    model = build_model(args.shape, len(tok), tok.pad_token_id, args.device, dtype)
    hp = paper_hparams(model, args)
    layout = ModelLayout.from_model(model)
    layout.check_layers(hp.layers)
    sizes = Sizes.of(model, layout, hp.layers[-1])
    placement = {n: (p.device, p.dtype) for n, p in model.named_parameters()}
    counter, memory = FlopCounter(model, layout, sizes), PeakMemory(device, baseline)
    # Rates of products shaped as the phases' own: the MLP's input projection over a batch of
    # tokens in the model's dtype, square Gram and solve products of the keys' width.
    tokens, width = (8192, 4096) if device.type == "cuda" else (2048, min(4096, sizes.key_dim))
    rates = {"matmul_flops": matmul_rate(dtype, device, tokens, sizes.hidden, sizes.key_dim),
             "float32_flops": matmul_rate(torch.float32, device, width, width, width),
             "float64_flops": matmul_rate(torch.float64, device, width, width, width)}
    summary: dict[str, Any] = {
        "shape": args.shape, "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype, "params": sum(p.numel() for p in model.parameters()), "layers": hp.layers,
        "key_dim": sizes.key_dim, "requests": args.requests, "stats_samples": args.stats_samples, "torch_threads": torch.get_num_threads(), **rates,
    }
    print(json.dumps(summary), flush=True)
    results: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="scale_gpu_"))
    atexit.register(shutil.rmtree, work, True)  # statistics of an 8B model's edit layers take gigabytes
    options = EditOptions(corpus="wikipedia-sample", stats_dir=str(work / "stats"), stats_batch_tokens=args.stats_batch_tokens,
                          batch_size=args.batch_size, target_cache=str(work / "targets"), seed=args.seed)
    corpus = load_corpus("wikipedia-sample")
    n_edit = len(hp.layers)

    # The float64 sums stay on a GPU only where they take at most half its free memory.
    sums_on_device = device.type == "cpu" or device.type == "cuda" and n_edit * sizes.key_dim**2 * 8 <= torch.cuda.mem_get_info(device)[0] / 2
    with phase("stats", results, memory, device, counter) as row:
        SecondMomentCache(options.stats_dir).get(model, tok, layout, hp.layers, corpus, hp.mom2_n_samples, hp.mom2_max_tokens,
                                                 hp.mom2_dtype, batch_tokens=options.stats_batch_tokens)
        tokens = counter.tokens[0]
        gram = tokens * sizes.key_dim**2 * n_edit  # the symmetric half of KᵀK: d²/2 multiply-adds a token
        row |= {"tokens": tokens, "predicted_memory_gib": stats_memory(sizes, n_edit, args.stats_batch_tokens, sums_on_device) / GIB,
                "limit_s": counter.forward_flops() / rates["matmul_flops"] + gram / rates["float32_flops"]}
    check_placement(model, placement)
    row["tokens_per_s"] = row["tokens"] / row["seconds"]

    requests = load_requests(args.requests_file or [str(DATA / "counterfact_mend" / f) for f in ("counterfact-edit.json", "counterfact-train.json")], args.requests)
    templates = context_templates(model, tok, hp, options)
    z_layer = hp.layers[-1]

    def target_phase(name: str, requests: list, options: EditOptions) -> None:
        step_tokens = [0]

        def largest_step(_module, inputs, _output):
            step_tokens[0] = max(step_tokens[0], inputs[0].shape[:-1].numel())

        handle = model.get_output_embeddings().register_forward_hook(largest_step)
        with phase(name, results, memory, device, counter) as row:
            layer_targets(model, tok, layout, requests, hp, templates, options)
            # Backward passes reach the layers above the edit layer and the head, input gradients only.
            flops = counter.forward_flops() + counter.forward_flops(z_layer + 1)
            row |= {"requests": len(requests), "batch_size": options.batch_size, "steps": hp.v_num_grad_steps,
                    "predicted_memory_gib": targets_memory(sizes, sizes.n_layers - 1 - z_layer, step_tokens[0]) / GIB,
                    "limit_s": flops / rates["matmul_flops"]}
        handle.remove()
        row["requests_per_s"] = len(requests) / row["seconds"]
        check_placement(model, placement)

    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        sample = requests[: min(len(requests), 2 * batch_size)]
        timing = dataclasses.replace(options, batch_size=batch_size, target_cache=None)
        target_phase(f"targets_bs{batch_size}", sample, timing)
    target_phase("targets", requests, options)

    editor = TimedMEMIT(hp, options)
    with phase("edit", results, memory, device, counter) as row:
        edit = editor.edit(model, tok, requests)
        solves = n_edit * solve_flops(sizes.key_dim, sizes.hidden, len(requests))
        row |= {"requests": len(requests), "predicted_memory_gib": edit_memory(sizes, n_edit, len(requests), device.type == "cpu") / GIB,
                "limit_s": counter.forward_flops() / rates["matmul_flops"] + solves / rates["float64_flops"],
                "solve_limit_s": solves / rates["float64_flops"],
                "solve_s": editor.solve_seconds, "keys_s": {k: editor.layer_seconds[k] - editor.solve_seconds[k] for k in editor.solve_seconds}}
    check_placement(model, placement, edit.deltas)
    row["requests_per_s"] = len(requests) / row["seconds"]

    spec, cases = get_dataset("cf"), load_cases("cf", args.counterfact, limit=args.cases)[2]
    with phase("scoring", results, memory, device, counter) as row:
        # The teacher-forced metrics as memit evaluate scores them: several cases' prompts in shared batches.
        for _ in evaluate_cases(model, tok, cases, Scoring(fmt=RAW, answer_tokens=None), spec):
            pass
        row |= {"cases": len(cases), "limit_s": counter.forward_flops() / rates["matmul_flops"]}
    check_placement(model, placement, edit.deltas)
    row["cases_per_s"] = len(cases) / row["seconds"]
    counter.remove()

    by_name = {r["phase"]: r for r in results}
    summary["end_to_end_s"] = sum(by_name[p]["seconds"] for p in ("stats", "targets", "edit"))
    summary["phases"] = results
    return summary


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['shape']} on {summary['device_name']} ({summary['dtype']}, {summary['params'] / 1e9:.2f} B parameters, "
        f"keys of width {summary['key_dim']}, layers {summary['layers']}); matmul {summary['matmul_flops'] / 1e12:.2f} TFLOP/s, "
        f"float32 {summary['float32_flops'] / 1e12:.2f}, float64 {summary['float64_flops'] / 1e12:.2f}",
        "| phase | seconds | throughput | peak memory GiB | predicted GiB | of the FLOP limit |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in summary["phases"]:
        rate = next((f"{r[k]:.3g} {k.removesuffix('_per_s')}/s" for k in ("tokens_per_s", "requests_per_s", "cases_per_s") if k in r), "")
        predicted = f"{r['predicted_memory_gib']:.2f}" if "predicted_memory_gib" in r else "-"
        lines.append(f"| {r['phase']} | {r['seconds']:.1f} | {rate} | {r['peak_memory_gib']:.2f} | {predicted} | {100 * r['of_limit']:.1f}% |")
    lines.append(f"end to end (statistics, target vectors, edit): {summary['end_to_end_s']:.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    summary = run(args)
    print(table(summary), flush=True)
    if args.out:
        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
