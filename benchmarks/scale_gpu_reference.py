"""The paper's MEMIT code through the phases of benchmarks/scale_gpu.py, on the same shape and device.

    PYTHONPATH=SITE python benchmarks/scale_gpu_reference.py --src CHECKOUT --tokenizer DIR \\
        --shape llama3-8b --requests 100 --stats-samples 2000 [--memit scale_llama3-8b.json] [--out ref.json]

``CHECKOUT`` is a checkout of the paper's repository (kmeng01/memit; none of its code is part
of memit) and ``SITE`` a folder with the packages it needs beside torch: transformers 4.46
(whose Llama layers return the tuples its hooks expect), tokenizers 0.20, huggingface_hub 0.26
and nltk (``pip install --target SITE --no-deps ...``). ``DIR`` holds the default model's
tokenizer (``tokenizer.json``), the vocabulary memit's run builds its model with. This script
imports nothing from memit: the paper's package is also called ``memit``.

The model is built as scale_gpu.py builds it (benchmarks/shapes.py, random weights, the
model's dtype), with the paper's GPT-J hyperparameters, its edit layers kept where the model
has them, its modules named for the architecture and its statistics read from the packaged
Wikipedia sample (benchmarks/reference_shim.py). Phases, each one JSON line:

1. ``stats``: the paper's ``get_cov`` for each edit layer (one pass over the corpus per layer);
2. ``targets``: its ``compute_z``, one request at a time, timed inside ``apply_memit_to_model``;
3. ``edit``: the rest of ``apply_memit_to_model``: context templates, keys and solves;
4. ``scoring``: its ``compute_rewrite_quality_counterfact`` on ``--cases`` cases.

With ``--memit`` (the JSON scale_gpu.py wrote for the same shape and device), a table of both
per request or case, and the paper's code's time over memit's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memory import peak_rss, reset_peak, rss  # benchmarks/memory.py: stdlib only
from reference_shim import install as install_shim
from shapes import SHAPES

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))
GIB = 2**30
# Module names of the architectures the shapes use, as the paper's hyperparameters name them.
MODULES = {
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  mlp_module_tmp="model.layers.{}.mlp", attn_module_tmp="model.layers.{}.self_attn",
                  ln_f_module="model.norm"),
    "gptj": dict(rewrite_module_tmp="transformer.h.{}.mlp.fc_out", layer_module_tmp="transformer.h.{}",
                 mlp_module_tmp="transformer.h.{}.mlp", attn_module_tmp="transformer.h.{}.attn",
                 ln_f_module="transformer.ln_f"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=os.environ.get("MEMIT_REFERENCE_SRC"), help="checkout of kmeng01/memit")
    p.add_argument("--tokenizer", required=True, help="folder with the default model's tokenizer.json")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--stats-samples", type=int, default=2000)
    p.add_argument("--stats-max-tokens", type=int, default=None, help="tokens per corpus sample (default: the context length, at most 2,048)")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps per target vector (default: the paper's)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--counterfact", default=str(DATA / "counterfact_subset400.json"), help="CounterFact records in the paper's format")
    p.add_argument("--memit", default=None, help="scale_gpu.py's JSON for the same shape and device, for the side-by-side table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    for name in ("src", "tokenizer", "counterfact", "memit", "out"):  # the run changes directory
        if getattr(args, name):
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    if not args.src or not (Path(args.src) / "memit" / "memit_main.py").is_file():
        p.error(f"--src: a checkout of kmeng01/memit (with memit/memit_main.py) is needed, got {args.src!r}")
    return args


def build_model(shape: str, tok, device: str, dtype: torch.dtype, max_tokens: int | None):
    """The shape with random weights, and the config attributes the paper's code reads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id, **spec)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    model.eval().requires_grad_(False)
    context = getattr(config, "max_position_embeddings", None) or config.n_positions
    model.config.n_positions = max_tokens or min(context, 2048)  # its statistics' sample length
    model.config.n_embd = config.hidden_size
    model.config._name_or_path = f"random-{shape}"
    return model


def head_module_name(model) -> str:
    """The module whose ``weight`` the paper's code reads as the output head: the input
    embedding where the two are tied (the tied weight is a parameter of that module only)."""
    head = model.get_input_embeddings() if model.config.tie_word_embeddings else model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head)


def paper_hparams(src: Path, model, args: argparse.Namespace):
    """The paper's GPT-J hyperparameters, with the layer rule of scale_gpu.paper_hparams."""
    from memit import MEMITHyperParams

    data = json.loads((src / "hparams" / "MEMIT" / "EleutherAI_gpt-j-6B.json").read_text())
    n_layers = model.config.num_hidden_layers
    data["layers"] = [layer for layer in data["layers"] if layer < n_layers] or list(range(min(len(data["layers"]), n_layers)))
    data["v_loss_layer"] = n_layers - 1
    data["mom2_n_samples"] = args.stats_samples
    data.update(MODULES[model.config.model_type], lm_head_module=head_module_name(model))
    if args.steps is not None:
        data["v_num_grad_steps"] = args.steps
    return MEMITHyperParams(**data)


class Phase:
    """Seconds and peak memory of one phase (allocated GPU memory on CUDA, else the resident
    high-water mark above the resident size before the model was built)."""

    def __init__(self, device: torch.device, baseline: int):
        self.device, self.baseline = device, baseline

    @contextlib.contextmanager
    def measure(self, name: str, results: list[dict]):
        row: dict[str, Any] = {"phase": name}
        self.reset()
        start = time.perf_counter()
        yield row
        self.sync()
        row["seconds"] = row.get("seconds", time.perf_counter() - start)
        row["peak_memory_gib"] = row.get("peak_memory_gib", self.peak() / GIB)
        results.append(row)
        print(json.dumps(row), flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self) -> None:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak()

    def peak(self) -> int:
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss() - self.baseline


def run(args: argparse.Namespace) -> dict[str, Any]:
    src = Path(args.src)
    records = json.loads(Path(args.counterfact).read_text())
    install_shim()  # before the paper's code: its corpus, downloads and devices
    sys.path.insert(0, str(src))
    os.chdir(src)  # the paper's code reads globals.yml from the working directory
    import memit.memit_main as paper
    from experiments.py.eval_utils_counterfact import compute_rewrite_quality_counterfact
    from transformers import PreTrainedTokenizerFast

    from memit import apply_memit_to_model

    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(args.tokenizer) / "tokenizer.json"))
    tok.pad_token = tok.pad_token or tok.eos_token or "<|im_end|>"
    tok.eos_token = tok.eos_token or tok.pad_token
    tok.padding_side = "right"
    baseline = rss()
    model = build_model(args.shape, tok, args.device, dtype, args.stats_max_tokens)
    hp = paper_hparams(src, model, args)
    placement = {n: (p.device, p.dtype) for n, p in model.named_parameters()}
    phase = Phase(device, baseline)
    summary: dict[str, Any] = {
        "code": "kmeng01/memit", "shape": args.shape, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "dtype": args.dtype,
        "params": sum(p.numel() for p in model.parameters()), "layers": hp.layers, "requests": args.requests,
        "stats_samples": args.stats_samples, "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(summary), flush=True)
    results: list[dict] = []
    work = Path(tempfile.mkdtemp(prefix="scale_reference_"))
    paper.STATS_DIR = work / "stats"
    chatter = open(work / "printed.txt", "w")  # the paper's code prints every optimisation step

    with phase.measure("stats", results) as row, contextlib.redirect_stdout(chatter):
        for layer in hp.layers:
            paper.get_cov(model, tok, hp.rewrite_module_tmp.format(layer), hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype)
        row |= {"samples": args.stats_samples, "passes": len(hp.layers)}
    row["samples_per_s"] = args.stats_samples / row["seconds"]

    z_time, z_peak = [0.0], [0]
    compute_z = paper.compute_z

    def timed_compute_z(*a, **k):
        phase.reset()
        start = time.perf_counter()
        z = compute_z(*a, **k)
        phase.sync()
        z_time[0] += time.perf_counter() - start
        z_peak[0] = max(z_peak[0], phase.peak())
        return z

    paper.compute_z = timed_compute_z
    requests = [{"case_id": r["case_id"], **r["requested_rewrite"]} for r in records[: args.requests]]
    if len(requests) < args.requests:
        raise SystemExit(f"--requests {args.requests}: {args.counterfact} holds only {len(requests)} records")
    edit_peak = [0]
    with contextlib.redirect_stdout(chatter):
        start = time.perf_counter()
        # Peaks are reset around each target vector: the edit's peak is read after the last one.
        apply_memit_to_model(model, tok, requests, hp)
        phase.sync()
        total = time.perf_counter() - start
        edit_peak[0] = phase.peak()
    paper.compute_z = compute_z
    for name, seconds, peak in (("targets", z_time[0], z_peak[0]), ("edit", total - z_time[0], edit_peak[0])):
        row = {"phase": name, "requests": len(requests), "seconds": seconds, "peak_memory_gib": peak / GIB,
               "seconds_per_request": seconds / len(requests), "requests_per_s": len(requests) / seconds}
        results.append(row)
        print(json.dumps(row), flush=True)
    _check_placement(model, placement)

    cases = records[: args.cases]
    with phase.measure("scoring", results) as row, contextlib.redirect_stdout(chatter):
        for record in cases:
            compute_rewrite_quality_counterfact(model, tok, record, None, None)
        row["cases"] = len(cases)
    row["cases_per_s"] = len(cases) / row["seconds"]
    _check_placement(model, placement)
    chatter.close()
    summary["phases"] = results
    if args.out:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(args.out)
    return summary


def _check_placement(model, placement: dict) -> None:
    moved = [n for n, p in model.named_parameters() if (p.device, p.dtype) != placement[n]]
    if moved:
        raise RuntimeError(f"the paper's code moved or recast parameters: {moved[:3]}")


def side_by_side(reference: dict[str, Any], ours: dict[str, Any]) -> str:
    """Seconds per corpus sample (statistics), per request (target vectors, edit) and per case
    (scoring) of each, and the paper's code's over memit's."""
    if (reference["shape"], reference["dtype"], reference["device_name"]) != (ours["shape"], ours["dtype"], ours["device_name"]):
        raise SystemExit("--memit: a run of another shape, dtype or device; compare runs of the same")
    units = {"stats": ("sample", lambda summary, row: summary["stats_samples"]),
             "targets": ("request", lambda summary, row: row["requests"]),
             "edit": ("request", lambda summary, row: row["requests"]),
             "scoring": ("case", lambda summary, row: row["cases"])}
    lines = [f"{ours['shape']} on {ours['device_name']} ({ours['dtype']}): seconds per unit",
             "| phase | unit | memit | paper's code | paper's / memit's | peak GiB, memit | peak GiB, paper's |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, (unit, count) in units.items():
        mine = next(r for r in ours["phases"] if r["phase"] == name)
        theirs = next(r for r in reference["phases"] if r["phase"] == name)
        a, b = mine["seconds"] / count(ours, mine), theirs["seconds"] / count(reference, theirs)
        lines.append(f"| {name} | {unit} | {a:.4g} | {b:.4g} | {b / a:.1f}x | {mine['peak_memory_gib']:.2f} | {theirs['peak_memory_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    if args.memit:
        print(side_by_side(summary, json.loads(Path(args.memit).read_text())), flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
