"""What the model says: next-token predictions and the probability of a given continuation."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.utils.compat import cache_from_pairs, cache_pairs, contiguous_head_input, empty_cache, last_logits_only


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


# (prompt, continuation) -> score, scored ahead together (prefetched_scores).
_PREFETCHED: contextvars.ContextVar[dict[tuple[str, str], "Continuation"] | None] = contextvars.ContextVar("prefetched", default=None)


@contextlib.contextmanager
def prefetched_scores(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> Iterator[None]:
    """Score all ``(prompt, continuation)`` pairs now, in shared batches; calls of
    `score_continuations` inside the block whose pairs are all among them read these
    scores (the model must not change inside the block)."""
    scores = score_continuations(model, tok, [p for p, _ in pairs], [c for _, c in pairs], batch_size) if pairs else []
    token = _PREFETCHED.set(dict(zip(pairs, scores)))
    try:
        yield
    finally:
        _PREFETCHED.reset(token)


def score_continuations(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    continuations: list[str],
    batch_size: int = 32,
    shared_prompts: bool = True,
) -> list[Continuation]:
    """Teacher-forced scores of ``continuations[i]`` after ``prompts[i]``.

    ``shared_prompts`` (the default): each distinct prompt runs once, its keys and values are
    kept, and all its continuations run after them (CounterFact scores two targets after every
    prompt); prompts of similar length are batched together, and the vocabulary head runs only
    at the positions that are read. False: each prompt + continuation as one sequence, as the
    paper's code does (the reference; the two agree within float rounding)."""
    prefetched = _PREFETCHED.get()
    if prefetched is not None and all(pair in prefetched for pair in zip(prompts, continuations)):
        return [prefetched[pair] for pair in zip(prompts, continuations)]
    if not shared_prompts:
        return _score_joined(model, tok, prompts, continuations, batch_size)
    unique = list(dict.fromkeys(prompts))
    prompt_ids = {p: tok(p)["input_ids"] for p in unique}
    cont_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in continuations]
    rows_of: dict[str, list[int]] = {p: [] for p in unique}
    for row, prompt in enumerate(prompts):
        rows_of[prompt].append(row)
    results: list[Continuation | None] = [None] * len(prompts)
    unique.sort(key=lambda p: len(prompt_ids[p]))
    for chunk in _similar_length_batches(unique, [len(prompt_ids[p]) for p in unique], batch_size):
        rows = [(i, r) for i, p in enumerate(chunk) for r in rows_of[p]]
        for (_, r), scored in zip(rows, _score_after_prompts(model, tok, [prompt_ids[p] for p in chunk], rows, cont_ids)):
            results[r] = scored
    return results  # type: ignore[return-value]


def _similar_length_batches(items: list[str], lengths: list[int], batch_size: int, max_padding: float = 0.1,
                            min_rows: int = 8) -> Iterator[list[str]]:
    """Consecutive runs of ``items`` (sorted by length) of at most ``batch_size``, cut early once
    a batch has ``min_rows`` and the next item would make padding more than ``max_padding`` of
    its tokens: CounterFact prompts run from 5 to 40 tokens, and fixed batches of 64 computed
    half again as many padded positions as real ones."""
    start, real = 0, 0
    for end, length in enumerate(lengths):
        rows = end - start
        if rows and (rows >= batch_size or (rows >= min_rows and (rows + 1) * length > (1 + max_padding) * (real + length))):
            yield items[start:end]
            start, real = end, 0
        real += length
    if start < len(items):
        yield items[start:]


def _score_after_prompts(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    rows: list[tuple[int, int]],
    cont_ids: list[list[int]],
) -> list[Continuation]:
    """Scores of ``cont_ids[r]`` after prompt ``i`` for each ``(i, r)`` of ``rows``: the prompts
    run once (left-padded, so their last tokens line up), then every continuation after its
    prompt's keys and values."""
    device = model.get_input_embeddings().weight.device
    batch = tok.pad({"input_ids": prompt_ids}, padding=True, padding_side="left", return_tensors="pt").to(device)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), contiguous_head_input(model):
        out = model(**batch, position_ids=positions, past_key_values=empty_cache(model), use_cache=True, **last_logits_only(model))
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    which = torch.tensor([i for i, _ in rows], device=device)
    conts = [cont_ids[r] for _, r in rows]
    longest = max(len(c) for c in conts)
    results = [Continuation([float(first[i, c[0]])], [int(first[i].argmax()) == c[0]]) for (i, _), c in zip(rows, conts)]
    if longest == 1:
        return results
    # Every continuation but its last token runs after its prompt; row j reads position t - 1 for token t.
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    inputs = torch.tensor([c[:-1] + [pad] * (longest - len(c)) for c in conts], device=device)
    cont_mask = torch.tensor([[1] * (len(c) - 1) + [0] * (longest - len(c)) for c in conts], device=device)
    cache = cache_from_pairs(model, [(k[which], v[which]) for k, v in cache_pairs(out.past_key_values)])
    attention = torch.cat([mask[which], cont_mask], dim=1)
    cont_positions = mask[which].sum(-1, keepdim=True) + torch.arange(longest - 1, device=device)
    with torch.no_grad():
        logits = model(input_ids=inputs, attention_mask=attention, position_ids=cont_positions, past_key_values=cache).logits
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    for j, c in enumerate(conts):
        for t in range(1, len(c)):
            row = log_probs[j, t - 1]
            results[j].token_logprobs.append(float(row[c[t]]))
            results[j].argmax_matches.append(int(row.argmax()) == c[t])
    return results


def _score_joined(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[str], continuations: list[str], batch_size: int
) -> list[Continuation]:
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
