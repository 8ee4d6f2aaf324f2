"""Hand computations for the metric tests."""
from __future__ import annotations

import torch


def nll_and_argmax(model, tok, prompt: str, target: str) -> tuple[float, list[bool]]:
    """Computed by hand from one unpadded forward pass over prompt + target."""
    prompt_ids = tok(prompt)["input_ids"]
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    nlls, hits = [], []
    for j, t in enumerate(target_ids):
        row = logp[len(prompt_ids) + j - 1]
        nlls.append(-float(row[t]))
        hits.append(int(row.argmax()) == t)
    return sum(nlls) / len(nlls), hits
