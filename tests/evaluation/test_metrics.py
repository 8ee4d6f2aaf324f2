"""Every metric against values computed by hand from a tiny random model's logits."""
from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from memit.evaluation.datasets import parse_records
from memit.evaluation.datasets.counterfact import evaluate_counterfact_case
from memit.evaluation.datasets.zsre import evaluate_zsre_case
from memit.evaluation.generation import (
    consistency,
    fluency,
    generate_greedy,
    local_tfidf,
    ngram_entropy,
    paper_tfidf,
    text_fluency,
)
from memit.evaluation.scoring import (
    GENERATION_BATCH,
    MAX_CASES_PER_TEXT_CHUNK,
    GenerationResources,
    Scoring,
    _text_chunks,
    evaluate_case,
    evaluate_cases,
)
from memit.stats import load_corpus

from .helpers import nll_and_argmax


def _greedy_word(model, tok, prompt: str) -> str:
    """A one-token target that the model ranks first after ``prompt`` (and that round-trips)."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        order = model(input_ids=ids).logits[0, -1].argsort(descending=True)
    for t in order[:50].tolist():
        text = tok.decode([t])
        if text.strip() and tok(text, add_special_tokens=False)["input_ids"] == [t] and int(order[0]) == t:
            return text
    pytest.skip("the tiny model's top token does not round-trip through the tokenizer")


@pytest.fixture(scope="module")
def biased_model(tiny_model, tokenizer):
    """The tiny model with " English" made the argmax after the rewrite prompt, so that
    top-1 accuracy is not trivially 0."""
    model = copy.deepcopy(tiny_model)
    ids = tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[0, -1]
        (token,) = tokenizer(" English", add_special_tokens=False)["input_ids"]
        model.lm_head.weight[token] = 50 * h / h.norm()
    return model


def test_counterfact_metrics_match_hand_computation(biased_model, tokenizer, cf_case):
    tiny_model = biased_model
    got = evaluate_counterfact_case(tiny_model, tokenizer, cf_case)
    groups = {
        "efficacy": ([cf_case.request.filled_prompt()], False),
        "paraphrase": (cf_case.paraphrase_prompts, False),
        "neighborhood": (cf_case.neighborhood_prompts, True),
    }
    for name, (prompts, true_wins) in groups.items():
        hand = []
        for p in prompts:
            nll_new, hits_new = nll_and_argmax(tiny_model, tokenizer, p, cf_case.request.target_new)
            nll_true, hits_true = nll_and_argmax(tiny_model, tokenizer, p, cf_case.request.target_true)
            hand.append((nll_new, nll_true, all(hits_true if true_wins else hits_new)))
        for row, (nll_new, nll_true, _) in zip(got["prompts"][name], hand):
            assert row["nll_new"] == pytest.approx(nll_new, abs=1e-4)
            assert row["nll_true"] == pytest.approx(nll_true, abs=1e-4)
        wins = [(t < n) if true_wins else (t > n) for n, t, _ in hand]
        diffs = [math.exp(-n) - math.exp(-t) for n, t, _ in hand]
        assert got[f"{name}_success"] == pytest.approx(sum(wins) / len(wins))
        assert got[f"{name}_magnitude"] == pytest.approx((-1 if true_wins else 1) * sum(diffs) / len(diffs), abs=1e-5)
        assert got[f"{name}_acc"] == pytest.approx(sum(c for *_, c in hand) / len(hand))
    # The new target is the argmax after the rewrite prompt: top-1 accurate and usually more likely.
    assert got["efficacy_acc"] == 1.0


def test_zsre_metrics_match_hand_computation(tiny_model, tokenizer):
    record = {
        "subject": "IAAF Combined Events Challenge",
        "src": "When was the inception of IAAF Combined Events Challenge?",
        "rephrase": "When was the IAAF Combined Events Challenge launched?",
        "alt": "2006 and later",
        "answers": ["1998"],
        "loc": "nq question: what is the name of the last episode of spongebob",
        "loc_ans": "The String",
        "pred": "2011",
        "cond": "",
    }
    case = parse_records([record], "zsre")[0]
    assert case.request.prompt == "When was the inception of {}?"
    assert case.request.target_new == " 2006 and later"
    got = evaluate_zsre_case(tiny_model, tokenizer, case)
    for name, prompt, target in (
        ("efficacy", record["src"], " 2006 and later"),
        ("paraphrase", record["rephrase"], " 2006 and later"),
        ("neighborhood", record["loc"] + "?", " The String"),
    ):
        _, hits = nll_and_argmax(tiny_model, tokenizer, prompt, target)
        assert got[f"{name}_acc"] == pytest.approx(sum(hits) / len(hits))
        assert got["prompts"][name]["token_correct"] == hits


def test_zsre_token_accuracy_counts_argmax_tokens(tiny_model, tokenizer):
    """An answer whose first token is the argmax and whose rest is not: accuracy 1/n."""
    prompt = "When was the inception of IAAF Combined Events Challenge?"
    first = _greedy_word(tiny_model, tokenizer, prompt)
    ids = tokenizer(prompt + first, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        worst = int(tiny_model(input_ids=ids).logits[0, -1].argmin())
    second = tokenizer.decode([worst])
    answer = first + second
    if tokenizer(answer, add_special_tokens=False)["input_ids"] != tokenizer(first, add_special_tokens=False)["input_ids"] + [worst]:
        pytest.skip("answer does not tokenize as built")
    case = parse_records([{"subject": "IAAF Combined Events Challenge", "src": prompt, "rephrase": prompt,
                           "alt": answer.strip(), "loc": "nq question: who", "loc_ans": "me"}], "zsre")[0]
    got = evaluate_zsre_case(tiny_model, tokenizer, case)
    assert got["efficacy_acc"] == pytest.approx(0.5)


def test_ngram_entropy_and_fluency_by_hand():
    text = "a b a b a"
    # bigrams: (a,b) x2, (b,a) x2 -> 1 bit; trigrams: (a,b,a) x2, (b,a,b) x1
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(text, 2) == pytest.approx(1.0)
    assert ngram_entropy(text, 3) == pytest.approx(h3)
    assert text_fluency(text) == pytest.approx((2 / 3 * 1.0 + 4 / 3 * h3) / 2)
    assert fluency([text, "x x x x"]) == pytest.approx(((2 / 3 + 4 / 3 * h3) / 2 + 0.0) / 2)
    # Punctuation is a word of its own, as with nltk.word_tokenize.
    assert ngram_entropy("Paris, France.", 2) == pytest.approx(math.log2(3))


def _hand_tfidf(docs: list[str], a: str, b: str) -> float:
    """scikit-learn's default TF-IDF (smooth idf, l2 norm) cosine, by hand."""
    import re

    words = lambda s: re.findall(r"(?u)\b\w\w+\b", s.lower())  # noqa: E731
    vocab = sorted({w for d in docs for w in words(d)})
    n = len(docs)
    idf = {w: math.log((1 + n) / (1 + sum(w in set(words(d)) for d in docs))) + 1 for w in vocab}

    def vec(s: str) -> np.ndarray:
        ws = words(s)
        v = np.array([ws.count(w) * idf[w] for w in vocab])
        return v / np.linalg.norm(v)

    return float(vec(a) @ vec(b))


def test_consistency_with_local_and_paper_tfidf(tmp_path):
    docs = ["Paris is the capital of France", "Berlin is the capital of Germany", "Rome pasta and pizza", "France has wine"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n")
    local = local_tfidf(load_corpus(corpus))
    assert local.source.startswith("local:corpus.txt-") and not local.is_papers
    gen = ["Paris has wine and pasta", "the capital"]
    snippets = ["France is in Europe", "Paris is the capital of France"]
    expected = _hand_tfidf(docs, " ".join(gen), " ".join(snippets))
    assert consistency(gen, snippets, local) == pytest.approx(expected)
    # The paper's files: an idf vector and a vocabulary; same numbers from the same idf.
    np.save(tmp_path / "idf.npy", local.vectorizer.idf_)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({k: int(v) for k, v in local.vectorizer.vocabulary_.items()}))
    paper = paper_tfidf(tmp_path)
    assert paper is not None and paper.is_papers
    assert consistency(gen, snippets, paper) == pytest.approx(expected)
    assert paper_tfidf(tmp_path / "missing") is None


def test_generation_is_greedy_prompt_plus_continuation(tiny_model, tokenizer):
    prompts = ["The capital of France is", "A much longer prompt about the history of Rome and"]
    texts = generate_greedy(tiny_model, tokenizer, prompts, max_new_tokens=5)
    for prompt, text in zip(prompts, texts):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        for _ in range(5):
            with torch.no_grad():
                nxt = tiny_model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        n = len(tokenizer(prompt)["input_ids"])
        assert text == prompt + tokenizer.decode(ids[0, n:], skip_special_tokens=True)
    assert tokenizer.padding_side == "right"




def test_cases_generated_together_match_one_at_a_time(tiny_model, tokenizer, cf_case):
    cases = [
        dataclasses.replace(cf_case, case_id=i, generation_prompts=prompts)
        for i, prompts in enumerate([["The capital of France is"], ["A much longer prompt about Rome and", "Paris is"], []])
    ]
    scoring = Scoring(generation=GenerationResources(), generation_tokens=6, answer_tokens=4)
    together = {case.case_id: metrics for case, metrics, _ in evaluate_cases(tiny_model, tokenizer, cases, scoring)}
    for case in cases:
        alone = evaluate_case(tiny_model, tokenizer, case, scoring)
        for key in ("generated_texts", "fluency", "generated_answers", "gen_efficacy", "gen_neighborhood_em"):
            assert together[case.case_id].get(key) == alone.get(key)
    assert "fluency" not in together[2] and len(together[1]["generated_texts"]) == 2
    assert len(together[2]["generated_answers"]) == 1 + len(cf_case.paraphrase_prompts) + len(cf_case.neighborhood_prompts)


def test_cases_scored_in_shared_batches_equal_one_case_at_a_time(default_model, counterfact_records):
    from memit.evaluation.datasets import parse_records
    from memit.evaluation.datasets.counterfact import counterfact_pairs, evaluate_counterfact_case
    from memit.predict import prefetched_scores, score_continuations

    model, tok = default_model
    cases = parse_records(counterfact_records[:3], "cf")
    alone = [evaluate_counterfact_case(model, tok, c) for c in cases]
    pairs = [pair for c in cases for pair in counterfact_pairs(c)]
    with prefetched_scores(model, tok, pairs):
        together = [evaluate_counterfact_case(model, tok, c) for c in cases]
        (p, t), = pairs[:1]
        assert score_continuations(model, tok, [p], [t])[0] is score_continuations(model, tok, [p], [t])[0]
    for a, b in zip(alone, together):
        for group, prompts in a["prompts"].items():
            for x, y in zip(prompts, b["prompts"][group]):
                assert (x["nll_new"], x["nll_true"]) == pytest.approx((y["nll_new"], y["nll_true"]), abs=1e-4)
        assert all(a[k] == b[k] for k in a if k.endswith("_success"))


def test_prompts_are_batched_by_length_with_little_padding():
    """Sorted prompts are cut into consecutive batches, at most ``batch_size`` each; once a batch
    has ``min_rows`` it ends before an item that would pad it beyond 10%."""
    from memit.predict import _similar_length_batches

    lengths = [5] * 10 + [6] * 3 + [20] * 2 + [40]
    items = [f"p{i}" for i in range(len(lengths))]
    batches = list(_similar_length_batches(items, lengths, batch_size=12))
    assert [b for batch in batches for b in batch] == items
    sizes = [[lengths[items.index(b)] for b in batch] for batch in batches]
    assert sizes == [[5] * 10, [6, 6, 6, 20, 20, 40]]  # a 6 would pad the first by 18%; the second is under min_rows (8)
    assert all(len(b) <= 4 for b in _similar_length_batches(items, lengths, batch_size=4))


def test_sparse_fluency_cases_share_one_decoding_batch(cf_case):
    # Fluency on every 10th case: the texts of many 48-case chunks are decoded together, up
    # to one batch of prompts, so the 100-token decode does not run on 2-prompt batches.
    cases = [dataclasses.replace(cf_case, case_id=i, generation_prompts=["a", "b"]) for i in range(2000)]
    scoring = Scoring(generation=GenerationResources(), generation_cases=frozenset(range(0, 2000, 10)))
    chunks = list(_text_chunks(cases, scoring, None))
    prompts = [sum(2 for c in chunk if c.case_id % 10 == 0) for chunk in chunks]
    assert [c.case_id for chunk in chunks for c in chunk] == list(range(2000))
    assert prompts[:-1] == [GENERATION_BATCH] * (len(chunks) - 1) and 0 < prompts[-1] <= GENERATION_BATCH
    # Without texts to decode, a run is capped so that answers and scores still come in chunks.
    assert max(len(chunk) for chunk in _text_chunks(cases, Scoring(), None)) == MAX_CASES_PER_TEXT_CHUNK


def test_the_vocabulary_head_of_a_frozen_model_reads_contiguous_rows(tiny_model, tokenizer):
    # A frozen model's head given the strided slice that logits_to_keep makes runs on torch's
    # slow CPU path (hundreds of times slower in bfloat16): scoring and generation hand it rows.
    from memit.predict import score_continuations

    model = copy.deepcopy(tiny_model).requires_grad_(False)
    seen: list[bool] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    prompts = ["The capital of France is", "A much longer prompt about the history of Rome and"]
    try:
        shared = score_continuations(model, tokenizer, prompts, [" Paris", " its emperors"])
        generate_greedy(model, tokenizer, prompts, max_new_tokens=2)
    finally:
        handle.remove()
    assert seen and all(seen)
    joined = score_continuations(model, tokenizer, prompts, [" Paris", " its emperors"], shared_prompts=False)
    assert [s.token_logprobs for s in shared] == [pytest.approx(j.token_logprobs, abs=1e-4) for j in joined]
