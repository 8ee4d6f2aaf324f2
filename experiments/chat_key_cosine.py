"""How far the chat template moves the keys an edit is written at.

    python experiments/chat_key_cosine.py [--model default] [--cases 30]

For the first ``--cases`` CounterFact cases of ``counterfact_subset400.json``: the MLP input at
the subject's last token of each rewrite prompt at every edit layer of the model's MEMIT preset,
read in three ways (the bare prompt, the prompt after one fixed sentence, and the prompt as a
user turn of the chat template), and the mean cosine between each pair, per layer. The numbers
behind ``keys_in_prompt_forms`` in docs/methods.md.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from memit import load_model
from memit.editing.keys import vectors_at_subject_many
from memit.editing.methods import resolve_hparams
from memit.evaluation.datasets import load_cases
from memit.models.layout import ModelLayout
from memit.prompt_format import prompt_format

DATA = Path(os.environ.get("MEMIT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PREFIX = "The following is a fact. "


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--cases", type=int, default=30)
    args = p.parse_args()
    model, tok = load_model(args.model, dtype=torch.float32)
    layout = ModelLayout.from_model(model)
    layers = resolve_hparams("MEMIT", None, model).layers
    requests = [case.request for case in load_cases(None, str(DATA / "counterfact_subset400.json"))[2][: args.cases]]
    chat = prompt_format(tok, chat_template=True)
    names = [layout.mlp_out_name(layer) for layer in layers]
    subjects = [r.subject for r in requests]
    forms = {
        "bare": [r.prompt for r in requests],
        "prefixed": [PREFIX + r.prompt for r in requests],
        "chat": [chat.prompt(r.prompt) for r in requests],
    }
    keys = {form: vectors_at_subject_many(model, tok, prompts, subjects, names, "input") for form, prompts in forms.items()}
    pairs = [("bare", "chat"), ("bare", "prefixed"), ("prefixed", "chat")]
    print(f"{len(requests)} CounterFact cases, mean cosine of the keys at the subject's last token")
    print(f"{'layer':>5} " + " ".join(f"{a + ' ~ ' + b:>18}" for a, b in pairs))
    for layer, name in zip(layers, names):
        cosines = [float(torch.nn.functional.cosine_similarity(keys[a][name], keys[b][name]).mean()) for a, b in pairs]
        print(f"{layer:>5} " + " ".join(f"{c:18.3f}" for c in cosines))


if __name__ == "__main__":
    main()
