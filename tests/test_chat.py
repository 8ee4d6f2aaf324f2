"""``memit chat`` on the real default model: a question, an edit made in the chat that changes
the answer, /undo back to the old answer with the weights bit for bit, the unedited answer
beside the edited one, bad /edit input answered while the chat goes on, and the real command
driven in a pseudo-terminal."""
from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from memit.chat import ChatSession, chat_loop, chat_request, combined, open_session
from memit.deltas import WeightDeltas
from memit.errors import InputError
from memit.requests import RequestError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QUESTION = "What sport does LeBron James play?"
EDIT = ("{} plays the sport of", "LeBron James", "football")
MAX_NEW_TOKENS = 48


def _weights(model, hparams) -> dict[str, torch.Tensor]:
    names = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in hparams.layers]
    return {name: model.get_parameter(name).detach().clone() for name in names}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def session(default_model, default_hparams):
    """A chat on the shared default model, which it leaves unedited."""
    model, tok = default_model
    chat = ChatSession(model, tok, default_hparams, max_new_tokens=MAX_NEW_TOKENS)
    yield chat
    while chat.undo() is not None:
        pass


def test_an_edit_in_the_chat_changes_the_answer_and_undo_restores_it_bit_for_bit(session, default_hparams, tmp_path):
    model = session.model
    unedited = _weights(model, default_hparams)
    streamed = io.StringIO()
    before = session.ask(QUESTION, streamed)
    assert "basketball" in before.lower() and "football" not in before.lower()
    assert streamed.getvalue().strip() == before  # the answer was written as it was generated
    assert session.history == [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": before}]
    assert session.undo() is None  # nothing to undo yet

    deltas, seconds = session.edit(*EDIT)
    assert seconds > 0 and deltas.applied and session.edited
    edited = _weights(model, default_hparams)
    assert not _same(edited, unedited)

    session.reset()
    after = session.ask(QUESTION)
    assert "football" in after.lower() and "basketball" not in after.lower()
    # The unedited model's answer beside it: the same weights, the edit taken out and put back.
    assert session.compare(QUESTION) == before
    assert _same(_weights(model, default_hparams), edited)
    assert len(session.history) == 2  # compare leaves the conversation alone

    saved = tmp_path / "edits"
    assert "Saved 1 edit" in session.save(saved)
    assert torch.equal(WeightDeltas.load(saved).deltas[next(iter(edited))], deltas.deltas[next(iter(edited))])

    request = session.undo()
    assert request.subject == "LeBron James" and request.target_new == " football"
    assert _same(_weights(model, default_hparams), unedited)
    session.reset()
    assert session.ask(QUESTION) == before
    assert not session.edited


def test_an_edit_chain_in_the_chat(default_model, default_hparams, tmp_path):
    """Edits append to the chain as batches, compare restores the chain's unedited weights for
    the answer and every batch after it, and /undo reverts the batch made in the chat."""
    model, tok = default_model
    hparams = dataclasses.replace(default_hparams, v_num_grad_steps=5)
    unedited = _weights(model, hparams)
    chat = open_session(model, tok, chain_dir=tmp_path / "chain", hparams=hparams, max_new_tokens=8)
    try:
        chat.edit(*EDIT)
        assert len(chat.chain) == 1 and (tmp_path / "chain" / "batch_00000").is_dir()
        edited = _weights(model, hparams)
        with chat.unedited():
            assert _same(_weights(model, hparams), unedited)
        assert _same(_weights(model, hparams), edited)
        chat.compare(QUESTION)
        assert _same(_weights(model, hparams), edited)
        assert "saves every edit" in chat.save(tmp_path / "chain")
        assert "as one deltas folder" in chat.save(tmp_path / "total")
        assert chat.undo() is not None and len(chat.chain) == 0
        assert _same(_weights(model, hparams), unedited)
    finally:
        chat.chain.revert()
    with pytest.raises(InputError, match="its own method"):
        open_session(model, tok, chain_dir=tmp_path / "chain", hparams=hparams)


def test_bad_edit_input_is_answered_in_one_line_and_the_chat_goes_on(session):
    lines = iter([
        "/edit",
        '/edit "{} plays the sport of" "LeBron James"',
        '/edit "plays the sport of" "LeBron James" football',
        '/edit "{} plays the sport of" "Michael Jordan" ""',
        '/edit "{} plays the sport of" "LeBron James football',
        "/undo",
        "/frobnicate",
        "/help",
        QUESTION,
        "/quit",
        "never read",
    ])
    out = io.StringIO()
    chat_loop(session, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "needs PROMPT SUBJECT TARGET, got 0 argument(s)" in text and "got 2 argument(s)" in text
    assert "Error: field 'prompt': 'plays the sport of' has no '{}'" in text
    assert "Error: field 'target_new' is empty" in text
    assert "Error: No closing quotation" in text
    assert "Nothing to undo" in text and "Unknown command /frobnicate" in text and "/save DIR" in text
    assert "basketball" in text  # the question after the mistakes was answered
    assert next(lines) == "never read" and not session.made


def test_edit_requests_of_the_chat():
    request = chat_request(*EDIT)
    assert (request.prompt, request.subject, request.target_new) == ("{} plays the sport of", "LeBron James", " football")
    # The subject spelled out in the prompt stands for {}.
    assert chat_request("LeBron James plays the sport of", "LeBron James", "football") == request
    for args, field in [
        (("plays the sport of", "LeBron James", "football"), "prompt"),
        (("{} plays {} the sport of", "LeBron James", "football"), "prompt"),
        (("{} plays the sport of", "  ", "football"), "subject"),
        (("{} plays the sport of", "LeBron James", ""), "target_new"),
    ]:
        with pytest.raises(RequestError, match=f"field '{field}'") as err:
            chat_request(*args)
        assert not str(err.value).startswith("request 0")


def test_a_model_without_a_chat_template_is_refused():
    tok = types.SimpleNamespace(chat_template=None)
    with pytest.raises(InputError, match="chat: this model's tokenizer has no chat template"):
        ChatSession(None, tok)
    with pytest.raises(InputError, match="no chat template"):
        open_session(None, tok)


def test_edits_combined_for_save(default_model):
    model, _ = default_model
    name = "model.layers.4.mlp.down_proj.weight"
    first = WeightDeltas({name: torch.ones(2, 3)}, {"algorithm": "MEMIT", "requests": [{"subject": "a"}]}, {"keys.layer4": torch.ones(1, 3)})
    second = WeightDeltas({name: torch.full((2, 3), 2.0)}, {"algorithm": "MEMIT", "requests": [{"subject": "b"}]}, {"keys.layer4": torch.zeros(1, 3)})
    total = combined([first, second], model)
    assert torch.equal(total.deltas[name], torch.full((2, 3), 3.0))
    assert total.state["keys.layer4"].shape == (2, 3)
    assert [r["subject"] for r in total.manifest["requests"]] == ["a", "b"] and total.manifest["algorithm"] == "MEMIT"


def _memit_executable() -> str:
    beside = Path(sys.executable).parent / "memit"
    found = str(beside) if beside.is_file() else shutil.which("memit")
    if not found:
        pytest.skip("the memit command is not installed")
    return found


def test_memit_chat_in_a_terminal(tmp_path, default_hparams):
    """The real command in a pseudo-terminal: a question, /edit, the same question answered with
    the new fact, /undo, the old answer again word for word, bad /edit input answered and the
    chat going on, /quit."""
    pexpect = pytest.importorskip("pexpect")
    hparams = tmp_path / "hparams.json"
    default_hparams.save(hparams)  # the test statistics' sample size: cached ones are reused
    env = {**os.environ, "TERM": "dumb", "COLUMNS": "500"}
    child = pexpect.spawn(_memit_executable(), ["chat", "--hparams", str(hparams), "--max-new-tokens", str(MAX_NEW_TOKENS)],
                          env=env, encoding="utf-8", timeout=300, dimensions=(50, 500))
    prompt = re.compile(r"\r\n(?:\x1b\[[0-9;?]*[A-Za-z])*> ")

    def say(line: str, timeout: int = 300) -> str:
        child.sendline(line)
        child.expect(prompt, timeout=timeout)
        return child.before.replace("\r", "").split("\n", 1)[-1].strip()  # less the echoed line

    try:
        child.expect("/help lists the commands")
        child.expect_exact("> ")
        before = say(QUESTION)
        assert "basketball" in before.lower() and "football" not in before.lower()
        edit = say('/edit "{} plays the sport of" "LeBron James" football', timeout=1800)  # statistics if not cached
        assert re.search(r"Edited 'LeBron James plays the sport of' -> 'football' in [0-9.]+ s", edit), edit
        after = say(QUESTION)
        assert "football" in after.lower() and "basketball" not in after.lower()
        assert "Undid 'LeBron James plays the sport of'" in say("/undo")
        assert "forgotten" in say("/reset")  # the question asked as the first time
        assert say(QUESTION) == before
        assert "Error: field 'prompt'" in say('/edit "plays the sport of" "LeBron James" football')
        assert "Error: No closing quotation" in say('/edit "{} plays the sport of" "LeBron James football')
        assert "basketball" in say("Which sport does LeBron James play?").lower()  # the chat goes on
        child.sendline("/quit")
        child.expect(pexpect.EOF, timeout=60)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
