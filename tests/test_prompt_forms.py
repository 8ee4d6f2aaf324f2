"""Target vectors optimised in several prompt forms (``z_prompt_forms``): the raw cloze prompt
and the same prompt as a user turn of the chat template."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from memit import MEMITHyperParams, edit_model
from memit.editing.context import flatten, get_context_templates
from memit.editing.hparams import HyperParamsError
from memit.editing.keys import KeyTemplates, compute_keys, vectors_at_subject
from memit.editing.targets import _build_problem, key_templates
from memit.evaluation.datasets.counterfact import magnitude, parse_counterfact, score_case, success
from memit.models.layout import ModelLayout
from memit.predict import score_continuations
from memit.prompt_format import prompt_format
from memit.requests import parse_requests
from tests.conftest import TEST_STATS_SAMPLES

BOTH = {"raw": 1.0, "chat": 1.0}
# Cases of counterfact_subset400.json whose edit with the raw form alone holds in raw prompts
# but not when the rewrite is asked in the default model's chat template.
CHAT_MISSES = [7, 16]
# Questions about those cases that the raw form does not make the edit answer; the chat form
# (target vectors and keys) answers the first, not the second.
QUESTIONS = {7: "Which continent is {} on?", 16: "Where was {} born?"}


def _cases(records, indices):
    return [parse_counterfact(records[i], i) for i in indices]


def _chat_success(model, tok, cases) -> list[float]:
    fmt = prompt_format(tok, chat_template=True)
    return [success(score_case(model, tok, case, fmt)["efficacy"], true_wins=False) for case in cases]


def test_the_chat_form_adds_chat_turns_to_the_target_loss(default_model, default_hparams):
    model, tok = default_model
    templates = get_context_templates(model, tok, default_hparams.context_template_length_params)
    requests = parse_requests([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}])
    raw = _build_problem(tok, requests, templates)
    both = _build_problem(tok, requests, templates, BOTH)
    texts = [tok.decode(ids[: int(n)]) for ids, n in zip(both.batch.input_ids, both.batch.lengths)]
    chat_rows = [i for i, text in enumerate(texts) if "<|im_start|>assistant\n" in text]
    assert chat_rows and all(both.seq_weight[i] > 0 for i in chat_rows)
    # The answer opens the assistant turn: its target token is "football" without a leading space.
    chat_targets = {int(both.target_tok[j]) for j in range(len(both.target_seq)) if int(both.target_seq[j]) in chat_rows}
    assert chat_targets == set(tok("football", add_special_tokens=False)["input_ids"])
    # The request's loss is split evenly between the forms, and the raw form alone is the paper's.
    raw_rows = [i for i in range(len(both.seq_weight)) if i not in chat_rows]
    assert float(both.seq_weight[raw_rows].sum()) == pytest.approx(0.5)
    assert float(both.seq_weight[chat_rows].sum()) == pytest.approx(0.5)
    assert float(raw.seq_weight.sum()) == pytest.approx(1.0) and len(raw.seq_weight) == len(raw_rows)
    # MEMIT reads the current value at the bare raw prompt in every configuration.
    assert texts[int(both.init_seq[0])].endswith("LeBron James plays the sport of")


def test_the_chat_context_form_puts_each_context_prefix_inside_the_user_turn(default_model, default_hparams):
    model, tok = default_model
    templates = get_context_templates(model, tok, default_hparams.context_template_length_params)
    prefixes = [t.replace("{}", "") for t in flatten(templates) if t != "{}"]
    requests = parse_requests([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}])
    problem = _build_problem(tok, requests, templates, {"raw": 1.0, "chat": 1.0, "chat_context": 2.0})
    texts = [tok.decode(ids[: int(n)]) for ids, n in zip(problem.batch.input_ids, problem.batch.lengths)]
    turns = [i for i, text in enumerate(texts) if "<|im_start|>assistant\n" in text]
    prefixed_turns = [i for i in turns if any(p.strip() and p.strip() in texts[i] for p in prefixes)]
    # One turn per context template (the bare prompt among them) and the chat form's bare turn.
    assert len(turns) == len(flatten(templates)) + 1 and len(prefixed_turns) == len(prefixes)
    assert all("plays the sport of<|im_end|>" in texts[i] for i in turns)
    assert float(problem.seq_weight[turns].sum()) == pytest.approx(0.75)
    assert float(problem.seq_weight[prefixed_turns].sum()) == pytest.approx(0.5 * len(prefixes) / len(flatten(templates)))


def test_the_question_form_asks_each_of_the_requests_questions_and_skips_requests_without(default_model, default_hparams):
    model, tok = default_model
    templates = get_context_templates(model, tok, default_hparams.context_template_length_params)
    requests = parse_requests([
        {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"},
         "questions": ["What sport does {} play?", "Which sport is {} known for?"]},
        {"prompt": "{} plays the sport of", "subject": "Serena Williams", "target_new": {"str": "golf"}},
    ])
    problem = _build_problem(tok, requests, templates, {"raw": 1.0, "question": 1.0})
    texts = [tok.decode(ids[: int(n)]) for ids, n in zip(problem.batch.input_ids, problem.batch.lengths)]
    asked = [i for i, text in enumerate(texts) if "<|im_start|>assistant\n" in text]
    assert [texts[i].split("<|im_start|>user\n")[1].split("<|im_end|>")[0] for i in asked] == [
        "What sport does LeBron James play?", "Which sport is LeBron James known for?"]
    assert all(int(problem.seq_request[i]) == 0 for i in asked)
    # Each request's loss sums to one: half the first's is its questions; the second has only the raw form.
    by_request = [float(problem.seq_weight[problem.seq_request[: len(problem.seq_weight)] == r].sum()) for r in (0, 1)]
    assert by_request == pytest.approx([1.0, 1.0])
    assert float(problem.seq_weight[asked].sum()) == pytest.approx(0.5)
    # With the question form alone, a request without questions is asked in the raw form.
    alone = _build_problem(tok, requests[1:], templates, {"question": 1.0})
    texts = [tok.decode(ids[: int(n)]) for ids, n in zip(alone.batch.input_ids, alone.batch.lengths)]
    rewrites = texts[: len(alone.seq_weight)]
    assert len(rewrites) == sum(map(len, templates)) and all("Serena Williams plays the sport of" in t for t in rewrites)


def _question_success(model, tok, requests) -> list[bool]:
    """The new target more likely than the true one at the start of the answer to each
    request's question, asked in the chat template."""
    fmt = prompt_format(tok, chat_template=True)
    wins = []
    for request in requests:
        prompt = fmt.prompt(request.questions[0].replace("{}", request.subject))
        new, true = score_continuations(model, tok, [prompt, prompt], [fmt.continuation(request.target_new), fmt.continuation(request.target_true)])
        wins.append(new.mean_nll < true.mean_nll)
    return wins


def test_an_edit_trained_in_the_chat_form_holds_when_asked_in_conversation(default_model, default_hparams, counterfact_records):
    model, tok = default_model
    cases = _cases(counterfact_records, CHAT_MISSES)
    requests = [dataclasses.replace(case.request, questions=(QUESTIONS[i],)) for i, case in zip(CHAT_MISSES, cases)]
    chat_hparams = MEMITHyperParams.preset("SmolLM2-135M-Instruct-chat")
    chat_hparams.mom2_n_samples = default_hparams.mom2_n_samples
    assert chat_hparams.z_prompt_forms == {"raw": 1.0, "chat": 2.0}
    raw_only = edit_model(model, tok, requests, dataclasses.replace(chat_hparams, z_prompt_forms={"raw": 1.0}))
    try:
        assert _chat_success(model, tok, cases) == [0.0] * len(cases)
        assert _question_success(model, tok, requests) == [False] * len(cases)
    finally:
        raw_only.revert(model)
    both = edit_model(model, tok, requests, chat_hparams)
    try:
        assert _chat_success(model, tok, cases) == [1.0] * len(cases)
        raw = prompt_format(tok, chat_template=False)
        assert all(success(score_case(model, tok, case, raw)["efficacy"], true_wins=False) == 1.0 for case in cases)
        assert _question_success(model, tok, requests) == [True, False]
    finally:
        both.revert(model)
    # Trained on the requests' own questions, the edits answer them.
    asked = edit_model(model, tok, requests, dataclasses.replace(chat_hparams, z_prompt_forms={"raw": 1.0, "question": 2.0}))
    try:
        assert _question_success(model, tok, requests) == [True] * len(cases)
    finally:
        asked.revert(model)


def test_a_tokenizer_without_a_chat_template_keeps_the_raw_form(default_model, default_hparams):
    model, tok = default_model
    plain_tok = copy.copy(tok)
    plain_tok.chat_template = None
    templates = get_context_templates(model, tok, default_hparams.context_template_length_params)
    requests = parse_requests([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}])
    problem = _build_problem(plain_tok, requests, templates, BOTH)
    raw = _build_problem(tok, requests, templates)
    assert torch.equal(problem.batch.input_ids, raw.batch.input_ids)
    assert torch.equal(problem.seq_weight, raw.seq_weight)


@pytest.mark.parametrize("forms, message", [
    ({"json": 1.0}, r"'z_prompt_forms': unknown form\(s\) \['json'\]"),
    ({"raw": 0.0}, "'z_prompt_forms': weights must be non-negative and one positive"),
    ({"raw": 1.0, "chat": -1.0}, "'z_prompt_forms': weights must be non-negative"),
    ({"raw": "high"}, "'z_prompt_forms' must be"),
])
def test_prompt_forms_are_validated(default_hparams, forms, message):
    with pytest.raises(HyperParamsError, match=message):
        MEMITHyperParams.from_dict({**default_hparams.to_dict(), "z_prompt_forms": forms})


def test_keys_in_prompt_forms_read_each_key_in_the_chat_turn_too(default_model, default_hparams):
    model, tok = default_model
    layout = ModelLayout.from_model(model)
    templates = get_context_templates(model, tok, default_hparams.context_template_length_params)
    requests = parse_requests([{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}])
    chat_forms = dataclasses.replace(default_hparams, z_prompt_forms={"raw": 1.0, "chat": 2.0})
    # Off (the default), or with the raw form alone, the keys are the paper's.
    assert key_templates(tok, templates, chat_forms) == KeyTemplates.of(templates)
    raw_only = dataclasses.replace(chat_forms, z_prompt_forms={"raw": 1.0}, keys_in_prompt_forms=True)
    assert key_templates(tok, templates, raw_only) == KeyTemplates.of(templates)
    both = key_templates(tok, templates, dataclasses.replace(chat_forms, keys_in_prompt_forms=True))
    chat_prompt = prompt_format(tok, chat_template=True).prompt("{} plays the sport of")
    assert both.groups[-1] == (prompt_format(tok, chat_template=True).prompt("{}"),)
    assert both.weights == pytest.approx((1 / 6, 1 / 6, 2 / 3))
    layer = default_hparams.layers[0]
    paper = compute_keys(model, tok, layout, requests, layer, templates)[0]
    chat = vectors_at_subject(model, tok, [chat_prompt], ["LeBron James"], layout.mlp_out_name(layer), "input")[0]
    assert float(torch.nn.functional.cosine_similarity(paper, chat, dim=0)) < 0.95
    mixed = compute_keys(model, tok, layout, requests, layer, both)[0]
    torch.testing.assert_close(mixed, paper / 3 + 2 * chat / 3, rtol=1e-5, atol=1e-5)


def test_keys_in_prompt_forms_is_validated(default_hparams):
    with pytest.raises(HyperParamsError, match="'keys_in_prompt_forms' must be bool"):
        MEMITHyperParams.from_dict({**default_hparams.to_dict(), "keys_in_prompt_forms": "yes"})


def test_keys_read_in_the_chat_turn_make_an_edit_hold_more_in_conversation(default_model, counterfact_records, tmp_path):
    model, tok = default_model
    cases = _cases(counterfact_records, [6, 7])
    chat_hparams = MEMITHyperParams.preset("SmolLM2-135M-Instruct-chat")
    chat_hparams.mom2_n_samples = TEST_STATS_SAMPLES
    fmt = prompt_format(tok, chat_template=True)
    asked = {}
    for keys_in_forms in (False, True):
        # The same target vectors (cached): only where the keys are read differs.
        hparams = dataclasses.replace(chat_hparams, keys_in_prompt_forms=keys_in_forms)
        deltas = edit_model(model, tok, [case.request for case in cases], hparams, target_cache=str(tmp_path))
        try:
            asked[keys_in_forms] = [score_case(model, tok, case, fmt) for case in cases]
        finally:
            deltas.revert(model)
    # One of case 7's two paraphrases, asked in the chat template, holds only with the chat-turn keys.
    assert [success(s["paraphrase"], true_wins=False) for s in asked[False]] == [1.0, 0.5]
    assert [success(s["paraphrase"], true_wins=False) for s in asked[True]] == [1.0, 1.0]
    # And the new target's lead over the true one, P(new) - P(true), grows on both kinds of question.
    for kind in ("efficacy", "paraphrase"):
        lead = {on: sum(magnitude(s[kind], true_wins=False) for s in asked[on]) for on in asked}
        assert lead[True] > lead[False], kind
