"""Generation-based metrics and chat-template prompts, checked against hand computations on
a tiny model, and an edit of the default model that changes what it says."""
from __future__ import annotations

import json

import pytest
import torch

from memit.errors import InputError
from memit.evaluation.answers import (
    JudgedAnswer,
    Probe,
    answer_head,
    answer_metrics,
    cut_answer,
    exact_match,
    first_said,
    generate_answers,
    judge,
    mentions,
    normalize_answer,
    sentence_end,
)
from memit.evaluation.datasets import DatasetError, parse_records
from memit.evaluation.datasets.counterfact import counterfact_probes, evaluate_counterfact_case
from memit.evaluation.datasets.zsre import evaluate_zsre_case
from memit.evaluation.runner import RunConfig, run_evaluation
from memit.evaluation.summary import format_comparison, summarize_run
from memit.predict import score_continuations
from memit.prompt_format import RAW, prompt_format

from ..conftest import ZSRE


def test_normalisation_and_judging():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffel tower"
    assert cut_answer(" French, and later English.\nNext") == "French, and later English."
    assert cut_answer(" Paris. It is big") == "Paris."
    assert cut_answer(" the U.S. Army. Then") == "the U.S. Army."  # initials do not end a sentence
    assert cut_answer(" St. Louis, Missouri") == "St. Louis, Missouri" and cut_answer("3.5 m") == "3.5 m"
    assert exact_match(" the French.", ["French"]) and not exact_match(" French and English", ["French"])
    assert first_said(" French and English", ["French"]) and first_said(" French.", [" french"])
    assert not first_said(" Frenchman", ["French"])  # whole words only
    assert not first_said(" He speaks French", ["French"])
    assert first_said(" Franklin, Kentucky", ["Lexington", "Franklin"])
    assert not first_said("", ["French"]) and not exact_match("", ["French"])
    assert mentions("The correct answer is: Vistula is located in Antarctica.", [" Antarctica"])
    assert not mentions(" Antarctican penguins.", ["Antarctica"]) and not mentions(" Antarctica. Also Europe", ["Europe"])
    assert answer_head(" Europe, while the other is African.") == "europe"
    assert answer_head(" The study of the effects of electricity on matter.") == "study of effects of electricity"


def test_answer_metrics_by_hand():
    def judged(group, exact, first):
        return JudgedAnswer(group, "p", ["a"], "g", exact, first)

    rows = [judged("efficacy", True, True), judged("paraphrase", False, True), judged("paraphrase", False, False),
            judged("multihop", False, False), judged("multihop", False, True)]
    got = answer_metrics(rows, any_groups=("multihop",))
    assert (got["gen_efficacy"], got["gen_efficacy_em"]) == (1.0, 1.0)
    assert (got["gen_paraphrase"], got["gen_paraphrase_em"]) == (0.5, 0.0)
    assert (got["gen_multihop"], got["gen_multihop_em"]) == (1.0, 0.0)  # any of the phrasings
    assert got["gen_efficacy_mention"] == 0.0  # made with mentions=False
    assert len(got["generated_answers"]) == 5


def _greedy_by_hand(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    for _ in range(max_new_tokens):
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        if nxt.item() == tok.eos_token_id:
            break
        text = tok.decode(ids[0, start:], skip_special_tokens=True).lstrip()
        if "\n" in text or sentence_end(text) is not None:
            break
    return tok.decode(ids[0, start:], skip_special_tokens=True)


def test_batched_answers_match_greedy_decoding_one_prompt_at_a_time(tiny_model, tokenizer):
    prompts = ["The capital of France is", "A much longer prompt about Rome, which is", "Q: who?"]
    got = generate_answers(tiny_model, tokenizer, prompts, max_new_tokens=12, batch_size=3)
    assert got == [_greedy_by_hand(tiny_model, tokenizer, p, 12) for p in prompts]
    assert tokenizer.padding_side == "right"


def test_chat_format_wraps_prompts_and_drops_the_target_space(tiny_model, tokenizer, cf_case):
    chat = prompt_format(tokenizer, chat_template=True)
    wrapped = chat.prompt("LeBron James plays the sport of")
    assert wrapped.startswith("<|im_start|>system") and wrapped.endswith("<|im_start|>assistant\n")
    assert "LeBron James plays the sport of" in wrapped
    assert chat.continuation(" football") == "football" and RAW.continuation(" football") == " football"
    # Teacher-forced CounterFact metrics under the chat format, by hand.
    got = evaluate_counterfact_case(tiny_model, tokenizer, cf_case, chat)
    prompt = chat.prompt(cf_case.request.filled_prompt())
    new, true = score_continuations(
        tiny_model, tokenizer, [prompt, prompt], [cf_case.request.target_new.strip(), cf_case.request.target_true.strip()]
    )
    assert got["efficacy_success"] == float(true.mean_nll > new.mean_nll)
    assert got["prompts"]["efficacy"][0]["nll_new"] == pytest.approx(new.mean_nll)


def test_chat_format_needs_a_chat_template(tokenizer):
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        with pytest.raises(InputError, match="chat_template"):
            prompt_format(tokenizer, chat_template=True)
    finally:
        tokenizer.chat_template = saved


def test_counterfact_probes_expect_new_then_true_targets(cf_case):
    probes = counterfact_probes(cf_case)
    assert [p.group for p in probes] == (
        ["efficacy"] + ["paraphrase"] * len(cf_case.paraphrase_prompts) + ["neighborhood"] * len(cf_case.neighborhood_prompts)
    )
    assert probes[0] == Probe("efficacy", cf_case.request.filled_prompt(), (cf_case.request.target_new,))
    assert probes[-1].answers == (cf_case.request.target_true,)


def test_zsre_portability_by_hand(tiny_model, tokenizer):
    record = json.loads(ZSRE.read_text())[0]
    case = parse_records([record], "zsre")[0]
    question, answer = record["portability"]["New Question"], record["portability"]["New Answer"]
    assert case.portability == (question, answer)
    got = evaluate_zsre_case(tiny_model, tokenizer, case)
    (score,) = score_continuations(tiny_model, tokenizer, [question], [" " + answer])
    assert got["portability_acc"] == sum(score.argmax_matches) / len(score.argmax_matches)
    probes = judge([Probe("portability", question, (answer,))], [" " + answer + ". Yes"])
    assert probes[0].first and probes[0].exact

    without = parse_records([{k: v for k, v in record.items() if k != "portability"}], "zsre")[0]
    assert "portability_acc" not in evaluate_zsre_case(tiny_model, tokenizer, without)
    broken = {**record, "portability": {"New Question": "Why?"}}
    with pytest.raises(DatasetError, match=r"record 0: missing field 'portability.New Answer'"):
        parse_records([broken], "zsre")


def test_an_edit_changes_what_the_model_says(default_model, default_hparams, tmp_path):
    """MEMIT on three zsRE questions: the unedited model does not answer with the new
    answers; the edited one says them first, and the run reports both views side by side."""
    model, tok = default_model
    records = json.loads(ZSRE.read_text())[:3]
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps(records))
    config = RunConfig(dataset="zsre", data_file=str(data), num_edits=3, out=str(tmp_path / "runs"))
    run_dir = run_evaluation(config, model, tok, default_hparams)
    cases = [json.loads(p.read_text()) for p in sorted(run_dir.glob("case_*.json"))]
    assert len(cases) == 3 and all(c["prompt_format"] == "raw" for c in cases)
    assert sum(c["pre"]["gen_efficacy"] for c in cases) == 0
    assert sum(c["post"]["gen_efficacy"] for c in cases) >= 2
    for c in cases:
        groups = [a["group"] for a in c["post"]["generated_answers"]]
        assert groups == ["efficacy", "paraphrase", "neighborhood", "portability"]
        assert {"portability_acc", "gen_portability", "gen_portability_em"} <= c["post"].keys()
    table = format_comparison([summarize_run(run_dir)])
    assert "gen. efficacy" in table and "| raw |" in table
