import json
import logging

import pytest
from click.testing import CliRunner

import memit.editing.keys
import memit.editing.targets
from memit import MEMITHyperParams, RequestError, edit_model, load_requests, parse_requests
from memit.cli import main
from memit.editing.prompts import tokenize_prompts
from memit.predict import score_continuations
from memit.requests import check_tokenization
from tests.conftest import random_llama

GOOD = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}
# A zsRE question whose subject ends in ")", which the tokenizer merges with the "?" after it.
ZSRE_MERGED = {"prompt": "Which corporation created {}?", "subject": "USS Leedstown (APA-56)", "target_new": "Boeing"}
TINY_HPARAMS = MEMITHyperParams(
    layers=[1, 2], v_num_grad_steps=15, v_lr=0.5, v_weight_decay=1e-3,
    clamp_norm_factor=20.0, kl_factor=0.0625, mom2_n_samples=20, mom2_max_tokens=64,
    mom2_update_weight=100.0, context_template_length_params=[[5, 2]], mom2_dataset="wikipedia-sample",
)


@pytest.fixture(scope="module")
def tok():
    """The default model's tokenizer alone (cheap to load), padded on the right as load_model pads."""
    from transformers import AutoTokenizer

    from memit.models.loading import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.pad_token, tok.padding_side = tok.pad_token or tok.eos_token, "right"
    return tok


def test_paper_form_and_plain_string_target_parse_alike():
    (a,) = parse_requests([GOOD])
    (b,) = parse_requests([{**GOOD, "target_new": "football"}])
    assert a == b
    assert a.target_new == " football"  # a leading space is added for tokenization
    assert a.filled_prompt() == "LeBron James plays the sport of"


def test_counterfact_record_is_accepted(counterfact_records):
    (request,) = parse_requests([counterfact_records[0]])
    rewrite = counterfact_records[0]["requested_rewrite"]
    assert request.subject == rewrite["subject"]
    assert request.target_true == " " + rewrite["target_true"]["str"]
    assert request.case_id == counterfact_records[0]["case_id"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": "LeBron James plays the sport of"}, "request 1: field 'prompt' must contain exactly one '{}'"),
        ({"prompt": "{} and {} play"}, "request 1: field 'prompt' must contain exactly one '{}'"),
        ({"subject": "  "}, "request 1: field 'subject' is empty"),
        ({"target_new": {"str": ""}}, "request 1: field 'target_new' is empty"),
        ({"target_new": {"text": "x"}}, "request 1: field 'target_new' needs a 'str' entry"),
        ({"target_new": 3}, "request 1: field 'target_new' must be a string"),
        ({"questions": "What sport does {} play?"}, "request 1: field 'questions' must be a list of strings"),
        ({"questions": ["What sport does he play?"]}, r"request 1: field 'questions\[0\]' must be a string with one '{}'"),
    ],
)
def test_bad_request_names_index_and_field(change, message):
    with pytest.raises(RequestError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_requests([GOOD, {**GOOD, "subject": "Other", **change}])


def test_questions_are_kept_and_written_back():
    request = parse_requests([{**GOOD, "questions": ["What sport does {} play?"]}])[0]
    assert request.questions == ("What sport does {} play?",)
    assert parse_requests([request.to_dict()])[0] == request
    assert "questions" not in parse_requests([GOOD])[0].to_dict()


def test_missing_field_is_named():
    with pytest.raises(RequestError, match="request 0: missing field 'subject'"):
        parse_requests([{"prompt": "{} is", "target_new": "x"}])


def test_duplicate_with_different_target_is_rejected():
    with pytest.raises(RequestError, match="request 1: duplicate of request 0"):
        parse_requests([GOOD, {**GOOD, "target_new": "tennis"}])
    # The same fact twice is harmless.
    assert len(parse_requests([GOOD, GOOD])) == 2


def test_a_subject_ending_inside_a_word_is_edited_at_that_word(tok):
    request = parse_requests([{"prompt": "{}a was a president of", "subject": "Obam", "target_new": "France"}])
    (token,) = check_tokenization(request, tok)
    assert (token.index, token.text, token.merged) == (1, "ama", True)  # "Ob" "ama"


def test_a_zsre_question_is_edited_at_the_token_merging_the_subject_with_the_question_mark(tok):
    good, merged = parse_requests([GOOD, ZSRE_MERGED])
    tokens = check_tokenization([good, merged], tok)
    assert not tokens[0].merged
    text = merged.filled_prompt()
    spans = tok(text, return_offsets_mapping=True)["offset_mapping"]
    # No token ends at the subject's ")": it shares ")?" with the question mark, the last token.
    subject_end = text.index(merged.subject) + len(merged.subject)
    assert all(b != subject_end for _, b in spans)
    assert (tokens[1].index, tokens[1].text, tokens[1].merged) == (len(spans) - 1, ")?", True)
    assert spans[tokens[1].index] == (subject_end - 1, subject_end + 1)
    # Keys and target vectors read the prompts (bare, or after a context) at that token.
    texts = [merged.prompt, "The news of the day. " + merged.prompt]
    batch = tokenize_prompts(tok, texts, [merged.subject] * 2)
    assert [tok.decode(batch.input_ids[row, pos]) for row, pos in enumerate(batch.subject_positions.tolist())] == [")?", ")?"]


def test_a_subject_absent_from_the_prompt_is_refused_naming_the_field(tok):
    with pytest.raises(RequestError, match="request 0: field 'prompt' must contain exactly one"):
        parse_requests([{**ZSRE_MERGED, "prompt": "Which corporation created the Golden Gate Bridge?"}])
    # A subject no token covers (a tokenizer that gives its characters no token) is refused too.
    (request,) = parse_requests([ZSRE_MERGED])
    with pytest.raises(RequestError, match="request 0: subject: no token of .* covers the subject"):
        check_tokenization([request], _WithoutSubjectTokens(tok, request.filled_prompt().index(request.subject)))


class _WithoutSubjectTokens:
    """A fast tokenizer's offsets with every token from ``cut`` on dropped."""

    is_fast = True

    def __init__(self, tok, cut: int):
        self.tok, self.cut = tok, cut

    def __call__(self, text, **kwargs):
        spans = self.tok(text, **kwargs)["offset_mapping"]
        return {"offset_mapping": [s for s in spans if s[1] <= self.cut]}


def test_a_merged_subject_is_edited_at_the_merged_token_on_a_tiny_model(default_model, tmp_path, monkeypatch, caplog):
    tok = default_model[1]
    model = random_llama(tok, num_layers=4, seed=3)
    read_at: list[tuple[str, str, str]] = []  # (module, text, its token where keys or the delta are read)

    def spy(module):
        real = module.tokenize_prompts

        def tokenize(tok, templates, subjects):
            batch = real(tok, templates, subjects)
            positions = batch.subject_positions.tolist()
            read_at.extend((module.__name__, text, tok.decode(batch.input_ids[row, positions[row]])) for row, text in enumerate(templates))
            return batch

        monkeypatch.setattr(module, "tokenize_prompts", tokenize)

    spy(memit.editing.keys)
    spy(memit.editing.targets)
    prompt = ZSRE_MERGED["prompt"].replace("{}", ZSRE_MERGED["subject"])
    before = score_continuations(model, tok, [prompt], [" Boeing"])[0].mean_nll
    with caplog.at_level(logging.WARNING, logger="memit.requests"):
        edit_model(model, tok, [ZSRE_MERGED], TINY_HPARAMS, stats_dir=str(tmp_path))
    after = score_continuations(model, tok, [prompt], [" Boeing"])[0].mean_nll
    assert after < before - 0.5
    # Keys (every layer, every context) and the target vector all sit on ")?" (the KL prompt
    # "{} is a" ends the subject on ")"); one warning says so.
    assert {(module, token) for module, text, token in read_at if "{}?" in text} == {
        ("memit.editing.keys", ")?"), ("memit.editing.targets", ")?")}
    assert {token for _, text, token in read_at if "{}?" not in text} == {")"}
    warnings = [r.getMessage() for r in caplog.records if r.name == "memit.requests" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "')?'" in warnings[0] and "USS Leedstown (APA-56)" in warnings[0]


def test_memit_edit_reports_a_merged_subject_token(default_model, tmp_path, caplog):
    tok = default_model[1]
    model_dir, hparams, requests, report = tmp_path / "model", tmp_path / "hparams.json", tmp_path / "requests.json", tmp_path / "report.json"
    random_llama(tok, num_layers=4, seed=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    TINY_HPARAMS.save(hparams)
    requests.write_text(json.dumps([ZSRE_MERGED, GOOD]))
    with caplog.at_level(logging.WARNING, logger="memit.requests"):
        result = CliRunner().invoke(main, [
            "edit", "--model", str(model_dir), "--requests", str(requests), "--hparams", str(hparams),
            "--stats-dir", str(tmp_path / "stats"), "--report", str(report),
        ])
    assert result.exit_code == 0, result.output
    assert result.output.count("note: the subject 'USS Leedstown (APA-56)' ends inside the token ')?'") == 1
    merged, good = json.loads(report.read_text())
    assert merged["pre"]["merged_subject_token"] == merged["post"]["merged_subject_token"] == ")?"
    assert "merged_subject_token" not in good["pre"]
    assert len([r for r in caplog.records if r.name == "memit.requests" and r.levelno == logging.WARNING]) == 1


def test_bad_input_fails_before_any_weight_changes(default_model):
    model, tok = default_model
    before = {k: v.clone() for k, v in model.state_dict().items() if "mlp" in k}
    with pytest.raises(RequestError):
        edit_model(model, tok, [GOOD, {"prompt": "Obama was a president of", "subject": "Obama", "target_new": "France"}])
    assert all(v.equal(model.state_dict()[k]) for k, v in before.items())


def test_non_json_requests_file_is_rejected(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text("prompt: {} plays")
    with pytest.raises(ValueError, match=f"requests file {path} is not valid JSON"):
        load_requests(path)
    path.write_text(json.dumps([GOOD]))
    assert load_requests(path)[0].subject == "LeBron James"
