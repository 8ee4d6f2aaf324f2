"""How null is AlphaEdit's null space on a model, and what each solve does with the edits.

Per edit layer: the share of the key second moment's dimensions and of its energy (trace)
below each threshold, the share of the edit keys' energy there, and, for a unit residual per
edit (keys of the first CASES requests of a data file, on the unedited model):
  gain         ‖ΔW‖_F / √n: how large the update is
  fit error    ‖ΔW Kᵀ - I‖_F / √n: how much of the residuals is left unwritten (0 all, 1 none)
  disturbance  tr(ΔW C ΔWᵀ) / n: the mean squared change of the layer's output on the corpus
               keys, which the preserved knowledge sees
for MEMIT's solve (its preset's λ) and AlphaEdit's for each threshold and ridge.

    python experiments/alphaedit_nullspace.py [--model default] [--data-file F] [--cases 100] \
        [--thresholds 0.01,0.02] [--ridges 1,10]
"""
from __future__ import annotations

import argparse

import torch

from memit import EditOptions
from memit.editing.alphaedit.main import AlphaEditEditor, null_space_projector, solve_projected_update
from memit.editing.common import context_templates, second_moments
from memit.editing.keys import compute_keys_at
from memit.editing.memit.main import solve_update
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import load_cases
from memit.evaluation.datasets.base import case_requests
from memit.models import load_model


def effect(update: torch.Tensor, keys: torch.Tensor, moment: torch.Tensor) -> str:
    """Gain, fit error and disturbance of the update for unit residuals (one row per key)."""
    n = len(keys)
    gain = update.norm() / n**0.5
    fit = (update @ keys.T - torch.eye(n, dtype=update.dtype)).norm() / n**0.5
    disturbance = torch.trace(update @ moment @ update.T) / n
    return f"gain {gain:.2f}, fit error {fit:.2f}, disturbance {disturbance:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data-file", default="../shared/data/counterfact_mend/counterfact-edit.json")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--thresholds", default="0.01,0.02")
    p.add_argument("--ridges", default="1,10")
    args = p.parse_args()
    model, tok = load_model(args.model)
    alpha = resolve_hparams("AlphaEdit", None, model)
    memit_weight = resolve_hparams("MEMIT", None, model).mom2_update_weight
    editor, options = AlphaEditEditor(alpha), EditOptions()
    layout = editor.layout(model)
    moments = second_moments(model, tok, layout, alpha, alpha.layers, editor.corpus(model, tok), options)
    _, _, cases = load_cases(None, args.data_file, limit=args.cases)
    requests = [r for case in cases for r in case_requests(case)]
    keys = compute_keys_at(model, tok, layout, requests, alpha.layers, context_templates(model, tok, alpha, options))
    unit = torch.eye(len(requests), dtype=torch.float64)
    print(f"{len(requests)} edits; MEMIT λ = {memit_weight:g}; AlphaEdit preset: threshold {alpha.nullspace_threshold:g}, ridge {alpha.L2:g}")
    for layer in alpha.layers:
        moment, k = moments[layer].double(), keys[layer].double().cpu()
        eigenvalues = torch.linalg.eigvalsh(moment)
        print(f"layer {layer}: {len(eigenvalues)} dims, eigenvalues min {eigenvalues[0]:.3g} median {eigenvalues.median():.3g} max {eigenvalues[-1]:.3g}")
        print(f"  MEMIT: {effect(solve_update(k, unit, moment, memit_weight), k, moment)}")
        for threshold in (float(t) for t in args.thresholds.split(",")):
            below = eigenvalues < threshold
            projector = null_space_projector(moment, threshold)
            in_null = ((k @ projector).norm(dim=1) ** 2 / k.norm(dim=1) ** 2).mean()
            print(f"  threshold {threshold:g}: null space {int(below.sum())} dims ({below.double().mean():.0%}) holding "
                  f"{eigenvalues[below].sum() / eigenvalues.sum():.1%} of the corpus keys' energy and {in_null:.1%} of the edit keys'")
            for ridge in (float(r) for r in args.ridges.split(",")):
                update = solve_projected_update(k, unit, projector, None, ridge)
                print(f"    AlphaEdit ridge {ridge:g}: {effect(update, k, moment)}")


if __name__ == "__main__":
    main()
