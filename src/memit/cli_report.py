"""Before/after predictions for each request, as the ``edit`` and ``demo`` commands show them."""
from __future__ import annotations

from typing import Any

import click
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.evaluation.answers import cut_answer, first_said, generate_answers
from memit.predict import score_continuations, top_next_tokens
from memit.requests import EditRequest, check_tokenization, merged_subject_note


def describe_predictions(model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest]) -> list[dict[str, Any]]:
    prompts = [r.filled_prompt() for r in requests]
    new = score_continuations(model, tok, prompts, [r.target_new for r in requests])
    with_true = [i for i, r in enumerate(requests) if r.target_true is not None]
    true = score_continuations(model, tok, [prompts[i] for i in with_true], [requests[i].target_true for i in with_true])
    true_by_index = dict(zip(with_true, true))
    said = generate_answers(model, tok, prompts)
    subject_tokens = check_tokenization(requests, tok)
    out = []
    for i, prompt in enumerate(prompts):
        entry: dict[str, Any] = {
            "prompt": prompt,
            "top_tokens": [{"token": t, "prob": p} for t, p in top_next_tokens(model, tok, prompt)],
            "target_new_prob": new[i].prob,
            # What the model says when it must produce the answer itself (greedy, one sentence).
            "says": cut_answer(said[i]),
            "says_target_new": first_said(said[i], [requests[i].target_new]),
        }
        if i in true_by_index:
            entry["target_true_prob"] = true_by_index[i].prob
        if subject_tokens[i].merged:
            # The edit is made at a token that runs past the subject: say so with its results.
            entry["merged_subject_token"] = subject_tokens[i].text
        out.append(entry)
    return out


def print_report(requests: list[EditRequest], before: list[dict], after: list[dict]) -> None:
    for request, pre, post in zip(requests, before, after):
        click.echo(f"\n{pre['prompt']!r}  (target_new {request.target_new!r}" + (f", target_true {request.target_true!r})" if request.target_true else ")"))
        if "merged_subject_token" in pre:
            click.echo(f"  note: {merged_subject_note(request, pre['merged_subject_token'])}")
        for label, entry in (("before", pre), ("after", post)):
            tops = ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in entry["top_tokens"])
            line = f"  {label:6} p(new)={entry['target_new_prob']:.3f}"
            if "target_true_prob" in entry:
                line += f" p(true)={entry['target_true_prob']:.3f}"
            click.echo(f"{line}  top: {tops}")
            click.echo(f"  {'':6} says: {entry['says']!r}")
