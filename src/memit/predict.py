"""What the model says: next-token predictions and the probability of a given continuation."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Continuation:
    """Per-token log-probabilities of a continuation, and the tokens the model ranks first."""

    token_logprobs: list[float]
    argmax_matches: list[bool]

    @property
    def mean_nll(self) -> float:
        """The paper's per-prompt score: mean negative log-likelihood per target token."""
        return -sum(self.token_logprobs) / len(self.token_logprobs)

    @property
    def prob(self) -> float:
        return float(torch.tensor(self.token_logprobs).sum().exp())


def score_continuations(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    continuations: list[str],
    batch_size: int = 32,
) -> list[Continuation]:
    """Teacher-forced scores of ``continuations[i]`` after ``prompts[i]``."""
    results: list[Continuation] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p = prompts[start : start + batch_size]
        chunk_c = continuations[start : start + batch_size]
        prompt_lens = [len(tok(p)["input_ids"]) for p in chunk_p]
        cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in chunk_c]
        batch = tok([p + c for p, c in zip(chunk_p, chunk_c)], padding=True, return_tensors="pt").to(model.device)
        with torch.no_grad():
            log_probs = torch.log_softmax(model(**batch).logits.float(), dim=-1)
        for row, (plen, ids) in enumerate(zip(prompt_lens, cont_ids)):
            positions = torch.arange(plen - 1, plen - 1 + len(ids), device=log_probs.device)
            token_ids = torch.tensor(ids, device=log_probs.device)
            rows = log_probs[row, positions]
            results.append(
                Continuation(
                    rows.gather(1, token_ids.unsqueeze(1)).squeeze(1).tolist(),
                    (rows.argmax(-1) == token_ids).tolist(),
                )
            )
    return results


def top_next_tokens(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    batch = tok(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        probs = torch.softmax(model(**batch).logits[0, -1].float(), dim=-1)
    top = probs.topk(k)
    return [(tok.decode(int(i)), float(p)) for p, i in zip(top.values, top.indices)]


def generate(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 30) -> str:
    """A greedy continuation, as the paper's fluency metric uses."""
    batch = tok(prompt, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
