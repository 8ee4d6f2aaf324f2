import json

import pytest

from memit import RequestError, edit_model, load_requests, parse_requests
from memit.requests import check_tokenization

GOOD = {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}}


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
    ],
)
def test_bad_request_names_index_and_field(change, message):
    with pytest.raises(RequestError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_requests([GOOD, {**GOOD, "subject": "Other", **change}])


def test_missing_field_is_named():
    with pytest.raises(RequestError, match="request 0: missing field 'subject'"):
        parse_requests([{"prompt": "{} is", "target_new": "x"}])


def test_duplicate_with_different_target_is_rejected():
    with pytest.raises(RequestError, match="request 1: duplicate of request 0"):
        parse_requests([GOOD, {**GOOD, "target_new": "tennis"}])
    # The same fact twice is harmless.
    assert len(parse_requests([GOOD, GOOD])) == 2


def test_subject_that_is_not_a_token_boundary_is_rejected(default_model):
    _, tok = default_model
    bad = parse_requests([GOOD, {"prompt": "{}a was a president of", "subject": "Obam", "target_new": "France"}])
    with pytest.raises(RequestError, match="request 1: subject: the tokens of 'Obam' cannot be located"):
        check_tokenization(bad, tok)


def test_bad_input_fails_before_any_weight_changes(default_model):
    model, tok = default_model
    before = {k: v.clone() for k, v in model.state_dict().items() if "mlp" in k}
    with pytest.raises(RequestError):
        edit_model(model, tok, [GOOD, {"prompt": "{}a was a president of", "subject": "Obam", "target_new": "France"}])
    assert all(v.equal(model.state_dict()[k]) for k, v in before.items())


def test_non_json_requests_file_is_rejected(tmp_path):
    path = tmp_path / "requests.json"
    path.write_text("prompt: {} plays")
    with pytest.raises(ValueError, match=f"requests file {path} is not valid JSON"):
        load_requests(path)
    path.write_text(json.dumps([GOOD]))
    assert load_requests(path)[0].subject == "LeBron James"
