"""Generation-based metrics: does the model *say* the answer when it must produce it itself?

The paper's metrics are teacher-forced: they compare the probabilities of two given
continuations. Here the model decodes greedily after a question (a `Probe`), the
answer is cut at the first newline or end of sentence, and it is judged three ways after
normalising case, punctuation, articles and spaces (as SQuAD's exact match does):

- ``exact``: the answer is one of the accepted answers;
- ``first``: the answer starts with an accepted answer (whole words), i.e. the target is
  the first thing said ("French, and later English" counts for "French");
- ``mentions``: an accepted answer occurs anywhere in it (whole words), as when a chat model
  restates the question first ("Vistula is located in Antarctica").

Per case and group: ``gen_<group>`` is the share of its probes judged ``first``,
``gen_<group>_em`` the share judged ``exact``, ``gen_<group>_mention`` the share judged
``mentions``. A group listed as "any" (MQuAKE's three
phrasings of one multi-hop question) counts 1 when any of its probes succeeds.
"""
from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from memit.evaluation.generation import greedy_continuations

DEFAULT_ANSWER_TOKENS = 24
HEAD_WORDS = 5
ANSWER_BATCH = 64
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
# A sentence ends at . ! or ? (and closing quotes or brackets) followed by a space, so "3.5"
# does not end one; nor does the dot of an initial ("U.S. Army") or of a common abbreviation.
_SENTENCE_END = re.compile(r"(\w*)([.!?])[\"')\]]*\s")
_ABBREVIATIONS = frozenset({"st", "mt", "ft", "dr", "mr", "mrs", "ms", "jr", "sr", "inc", "co", "ltd", "corp", "vs", "no"})


@dataclass(frozen=True)
class Probe:
    """A question of ``group`` whose greedy answer should be one of ``answers``."""

    group: str
    prompt: str
    answers: tuple[str, ...]


@dataclass
class JudgedAnswer:
    group: str
    prompt: str
    answers: list[str]
    generated: str
    exact: bool
    first: bool
    mentions: bool = False


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = _PUNCTUATION.sub(" ", text.lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def sentence_end(text: str) -> int | None:
    """The index just after the punctuation that ends ``text``'s first sentence, if it ends."""
    for match in _SENTENCE_END.finditer(text):
        word = match.group(1)
        if match.group(2) == "." and (len(word) == 1 and word.isalpha() or word.lower() in _ABBREVIATIONS):
            continue
        return match.end(2)
    return None


def cut_answer(text: str) -> str:
    """``text`` up to its first newline or end of sentence."""
    text = text.lstrip().split("\n", 1)[0]
    end = sentence_end(text + " ")
    return text if end is None else text[:end]


def exact_match(generated: str, answers: Iterable[str]) -> bool:
    said = normalize_answer(cut_answer(generated))
    return any(said == normalize_answer(a) for a in answers)


def mentions(generated: str, answers: Iterable[str]) -> bool:
    said = f" {normalize_answer(cut_answer(generated))} "
    return any(f" {a} " in said for a in map(normalize_answer, answers) if a)


def first_said(generated: str, answers: Iterable[str]) -> bool:
    said = normalize_answer(cut_answer(generated)).split()
    for answer in answers:
        words = normalize_answer(answer).split()
        if words and said[: len(words)] == words:
            return True
    return False


class _AnswerEnded(StoppingCriteria):
    """Per row: the new text holds a newline or a sentence end (the answer is complete)."""

    def __init__(self, tok: PreTrainedTokenizerBase, prompt_width: int):
        self.tok = tok
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [bool(t.strip()) and ("\n" in t.lstrip() or sentence_end(t.lstrip()) is not None) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_answers(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
    batch_size: int = ANSWER_BATCH,
) -> list[str]:
    """The greedy continuation of each prompt (batched, left-padded), stopped per row at the
    end of its answer or after ``max_new_tokens``; the prompt is not included."""
    return greedy_continuations(model, tok, prompts, max_new_tokens, batch_size, stop=lambda width: _AnswerEnded(tok, width))


def judge(probes: Sequence[Probe], generated: Sequence[str]) -> list[JudgedAnswer]:
    """Each probe's generated answer judged against its answers (the probe's prompt is kept
    as the data set writes it; the case file says how it was formatted)."""
    return [
        JudgedAnswer(p.group, p.prompt, list(p.answers), g, exact_match(g, p.answers), first_said(g, p.answers), mentions(g, p.answers))
        for p, g in zip(probes, generated)
    ]


def answer_metrics(judged: Sequence[JudgedAnswer], any_groups: Iterable[str] = ()) -> dict:
    """``gen_<group>`` and ``gen_<group>_em`` per group, and the judged answers."""
    any_groups = set(any_groups)
    out: dict = {}
    for group in dict.fromkeys(j.group for j in judged):
        members = [j for j in judged if j.group == group]
        for key, attr in ((f"gen_{group}", "first"), (f"gen_{group}_em", "exact"), (f"gen_{group}_mention", "mentions")):
            hits = [getattr(j, attr) for j in members]
            out[key] = float(any(hits)) if group in any_groups else sum(hits) / len(hits)
    out["generated_answers"] = [asdict(j) for j in judged]
    return out


def answer_head(generated: str, words: int = HEAD_WORDS) -> str:
    """What an answer says first: up to its first comma, semicolon or colon, at most ``words``
    normalised words ("Europe, while the other..." and "Europe, and it is..." agree)."""
    clause = re.split(r"[,;:]", cut_answer(generated), maxsplit=1)[0]
    return " ".join(normalize_answer(clause).split()[:words])


def unchanged_share(pre: Sequence[dict], post: Sequence[dict], group: str) -> float | None:
    """Share of ``group``'s questions whose answer head (`answer_head`) is the same
    after the edit as before; ``pre``/``post`` are a case's ``generated_answers``. For what
    must not change, this does not depend on the model knowing the true answer to begin with
    (whole sentences are too fragile to compare: their tails drift with any change)."""
    pairs = [(a, b) for a, b in zip(pre, post) if a["group"] == group and b["group"] == group]
    if not pairs:
        return None
    same = [answer_head(a["generated"]) == answer_head(b["generated"]) for a, b in pairs]
    return sum(same) / len(same)


__all__ = [
    "DEFAULT_ANSWER_TOKENS",
    "answer_head",
    "JudgedAnswer",
    "Probe",
    "answer_metrics",
    "cut_answer",
    "exact_match",
    "first_said",
    "generate_answers",
    "judge",
    "mentions",
    "normalize_answer",
    "sentence_end",
    "unchanged_share",
]
