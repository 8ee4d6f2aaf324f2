"""Context templates: short texts sampled from the model once, prefixed to rewrite prompts
so that an edit generalises beyond the bare prompt (the paper's ``get_context_templates``)."""
from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.models.loading import model_fingerprint
from memit.utils.io import memit_home, read_json, write_json

log = logging.getLogger(__name__)

STARTERS = ("The", "Therefore", "Because", "I", "You")
ContextTemplates = list[list[str]]


def get_context_templates(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    length_params: list[list[int]],
    seed: int = 0,
) -> ContextTemplates:
    """``[["{}"], [prefix. {} ...], ...]``: the bare prompt, then one group per ``[length, count]``.

    Cached on disk per model, since every request and every run reuses them.
    """
    key = "_".join(f"{length}x{count}" for length, count in length_params)
    path = memit_home() / "context_templates" / f"{model_fingerprint(model)}_{key}_s{seed}.json"
    if path.is_file():
        return read_json(path)
    generator = torch.Generator().manual_seed(seed)
    templates: ContextTemplates = [["{}"]]
    for length, count in length_params:
        texts = [
            text
            for i, starter in enumerate(STARTERS)
            for text in _sample(model, tok, starter, length, count // len(STARTERS) + (i < count % len(STARTERS)), generator)
        ]
        templates.append([t.replace("{", " ").replace("}", " ") + ". {}" for t in texts])
    write_json(path, templates)
    log.info("Context templates: %s", templates)
    return templates


def flatten(templates: ContextTemplates) -> list[str]:
    return [t for group in templates for t in group]


def _sample(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, starter: str, length: int, count: int, generator: torch.Generator
) -> list[str]:
    """``count`` top-5 samples continuing ``starter`` to ``length`` tokens in all, as the paper does."""
    if count == 0:
        return []
    ids = tok([starter] * count, return_tensors="pt")["input_ids"].to(model.device)
    with torch.no_grad():
        while ids.shape[1] < length:
            logits = model(input_ids=ids).logits[:, -1].float()
            top = logits.topk(5, dim=-1)
            probs = torch.softmax(top.values, dim=-1).cpu()
            choice = torch.multinomial(probs, 1, generator=generator).to(ids.device)
            ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
    return tok.batch_decode(ids, skip_special_tokens=True)
