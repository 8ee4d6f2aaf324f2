"""MEMIT's keys at each edit layer: from the residual kept below the last layer read, against a
forward pass from the embeddings per layer (the paper's computation).

    python benchmarks/layer_keys.py [--requests 100] [--threads 1]

One batch of CounterFact requests under the model's context templates, read at the preset's
edit layers in order, each layer's MLP output weights changed after its keys are read (as an
edit changes them). Both ways run in one process on the same weights; the keys must be equal
bit for bit. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from memit import load_model
from memit.editing.context import get_context_templates
from memit.editing.keys import KeysAcrossEdits, compute_keys
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import load_cases
from memit.evaluation.edit_cache import batch_requests
from memit.models.layout import ModelLayout

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--counterfact", default=str(DATA / "counterfact_subset400.json"))
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    hp = resolve_hparams("MEMIT", None, model)
    layout = ModelLayout.from_model(model)
    templates = get_context_templates(model, tok, hp.context_template_length_params)
    requests = batch_requests(load_cases("cf", args.counterfact)[2][: args.requests])
    originals = {layer: layout.mlp_out(model, layer).weight.detach().clone() for layer in hp.layers}
    torch.manual_seed(0)
    changes = {layer: 1e-2 * torch.randn_like(w) for layer, w in originals.items()}

    def read(keys_at) -> tuple[float, list[torch.Tensor]]:
        start, keys = time.perf_counter(), []
        for layer in hp.layers:
            keys.append(keys_at(layer))
            with torch.no_grad():
                layout.mlp_out(model, layer).weight.add_(changes[layer])
        seconds = time.perf_counter() - start
        with torch.no_grad():
            for layer, weight in originals.items():
                layout.mlp_out(model, layer).weight.copy_(weight)
        return seconds, keys

    full_s, full = read(lambda layer: compute_keys(model, tok, layout, requests, layer, templates))
    kept_s, kept = read(KeysAcrossEdits(model, tok, layout, requests, templates).at)
    result = {
        "model": args.model, "requests": len(requests), "prompts": len(requests) * sum(map(len, templates)), "layers": hp.layers,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "from_embeddings_s": round(full_s, 2), "from_kept_residual_s": round(kept_s, 2), "speedup": round(full_s / kept_s, 2),
        "equal": all(torch.equal(a, b) for a, b in zip(full, kept)),
    }
    print(f"keys at layers {hp.layers} of {result['prompts']} prompts: {full_s:.1f} s from the embeddings, "
          f"{kept_s:.1f} s from the kept residual ({result['speedup']}x), equal: {result['equal']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
