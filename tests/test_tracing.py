"""Causal tracing on a tiny random Llama: restoring everything gives the clean run back,
restoring nothing gives the corrupted run (checked by hand), and a data set is traced,
resumed, averaged and plotted, also from the command line."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from memit.cli import main
from memit.errors import InputError
from memit.models.layout import ModelLayout
from memit.tracing import TraceConfig, load_knowns, noise_level, summarize_traces, trace_dataset, trace_prompt
from memit.tracing.causal_trace import Trace, answer_probs, corrupted_subject, restored_layers, restoring, state_names, subject_range
from memit.tracing.run import POSITIONS, position_rows
from memit.utils.hooks import run_and_capture
from tests.conftest import random_llama

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"


@pytest.fixture(scope="module")
def tiny(default_model):
    tok = default_model[1]
    model = random_llama(tok, num_layers=4, seed=7)
    return model, tok, ModelLayout.from_model(model)


def test_subject_range_and_windows(tiny):
    _, tok, _ = tiny
    start, end = subject_range(tok, PROMPT, SUBJECT)
    ids = tok(PROMPT)["input_ids"]
    assert tok.decode(ids[start:end]).strip() == SUBJECT
    assert restored_layers("hidden", 3, 10, 30) == [3]
    assert restored_layers("mlp", 3, 10, 30) == list(range(0, 8))
    assert restored_layers("attn", 20, 10, 30) == list(range(15, 25))
    assert restored_layers("mlp", 28, 10, 30) == list(range(23, 30))


def test_restoring_every_hidden_state_gives_the_clean_probability(tiny):
    model, tok, layout = tiny
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    span = subject_range(tok, PROMPT, SUBJECT)
    clean = _clean_states(model, layout, ids, "hidden")
    answer = int(model(input_ids=ids).logits[0, -1].argmax())
    high = float(answer_probs(model, ids, answer)[0])
    noise = 5.0 * torch.randn(3, span[1] - span[0], 32, generator=torch.Generator().manual_seed(0))
    every = [(row, t) for row in range(3) for t in range(ids.shape[1])]
    with corrupted_subject(model, span, noise):
        low = answer_probs(model, ids.repeat(3, 1), answer)
        with restoring(model, clean, {name: every for name in clean}):
            restored = answer_probs(model, ids.repeat(3, 1), answer)
    assert restored.tolist() == pytest.approx([high] * 3, abs=1e-5)
    assert not torch.allclose(low, restored)


@pytest.mark.parametrize("kind", ["mlp", "attn"])
def test_restoring_puts_the_clean_module_outputs_back(tiny, kind):
    """MLP and attention outputs alone cannot undo the noise in the residual stream, but the
    restored outputs must be exactly the clean ones, at the restored rows and tokens only."""
    model, tok, layout = tiny
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    span = subject_range(tok, PROMPT, SUBJECT)
    clean = _clean_states(model, layout, ids, kind)
    names = list(clean)
    noise = 5.0 * torch.randn(2, span[1] - span[0], 32, generator=torch.Generator().manual_seed(0))
    plan = {name: [(1, span[1] - 1)] for name in names[1:3]}  # row 1, last subject token, layers 1-2
    with corrupted_subject(model, span, noise), restoring(model, clean, plan):
        seen = run_and_capture(model, {"input_ids": ids.repeat(2, 1)}, outputs_of=names)[1]
    for name in names[1:3]:
        assert torch.equal(seen[name][1, span[1] - 1], clean[name][span[1] - 1])
        assert not torch.allclose(seen[name][0, span[1] - 1], clean[name][span[1] - 1])
    assert not torch.allclose(seen[names[3]][1, span[1] - 1], clean[names[3]][span[1] - 1])


def _clean_states(model, layout, ids, kind):
    names = state_names(model, layout, kind)
    return {n: s[0] for n, s in run_and_capture(model, {"input_ids": ids}, outputs_of=names)[1].items()}


def test_nothing_restored_gives_the_corrupted_probability_by_hand(tiny):
    model, tok, layout = tiny
    noise = noise_level(model, tok, [SUBJECT, "Paris", "Barack Obama"])
    trace = trace_prompt(model, tok, layout, PROMPT, SUBJECT, "hidden", noise, samples=4, seed=3)
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    start, end = trace.subject_range
    sample_noise = noise * torch.randn(4, end - start, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).repeat(4, 1, 1)
        embeds[:, start:end] += sample_noise
        probs = torch.softmax(model(inputs_embeds=embeds).logits[:, -1].float(), -1)[:, trace.answer_id]
    assert trace.low == pytest.approx(float(probs.mean()), rel=1e-5)
    assert trace.high == pytest.approx(float(answer_probs(model, ids, trace.answer_id)[0]), rel=1e-6)
    # The last layer's output at the last token is all the head reads: restoring it is the clean run.
    assert trace.scores[-1][-1] == pytest.approx(trace.high, rel=1e-5)
    assert len(trace.scores) == len(trace.tokens) and len(trace.scores[0]) == layout.num_layers
    # Batched restorations equal one restoration at a time.
    small = trace_prompt(model, tok, layout, PROMPT, SUBJECT, "hidden", noise, samples=4, seed=3, max_rows=4)
    assert torch.allclose(torch.tensor(small.scores), torch.tensor(trace.scores), atol=1e-6)
    # Replaying the layers below each restored window equals computing them.
    for kind in ("hidden", "mlp"):
        fast = trace_prompt(model, tok, layout, PROMPT, SUBJECT, kind, noise, samples=4, seed=3, window=2)
        full = trace_prompt(model, tok, layout, PROMPT, SUBJECT, kind, noise, samples=4, seed=3, window=2, replay_lower_layers=False)
        assert torch.allclose(torch.tensor(fast.scores), torch.tensor(full.scores), atol=1e-5), kind
    with pytest.raises(InputError, match="kind"):
        trace_prompt(model, tok, layout, PROMPT, SUBJECT, "embedding", noise)


def _knowns_file(tmp_path, model, tok):
    """Facts whose attribute is the tiny model's own prediction, so it 'knows' them."""
    records = []
    for i, (subject, prompt) in enumerate([(SUBJECT, PROMPT), ("Barack Obama", "Barack Obama was born in"),
                                           ("Toyota", "Toyota is headquartered in")]):
        top = int(model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax())
        attribute = tok.decode([top]).strip() or "x"
        records.append({"known_id": i, "subject": subject, "prompt": prompt, "attribute": attribute + " more"})
    records.append({"known_id": 9, "subject": "Nobody", "prompt": "Nobody likes", "attribute": "\u2603 never said"})
    path = tmp_path / "known.json"
    path.write_text(json.dumps(records))
    return path


def test_dataset_traces_resume_average_and_plot(tiny, tmp_path):
    model, tok, _ = tiny
    knowns = load_knowns(_knowns_file(tmp_path, model, tok))
    out = tmp_path / "trace"
    config = TraceConfig(kinds=("hidden", "mlp"), samples=3, window=2)
    trace_dataset(model, tok, knowns, out, config)
    params = json.loads((out / "params.json").read_text())
    assert params["traced_known_ids"] == [0, 1, 2]  # the fact it does not predict is left out
    files = sorted((out / "traces").glob("*.json"))
    assert len(files) == 6
    stamps = {f: f.stat().st_mtime_ns for f in files}
    files[0].unlink()
    trace_dataset(model, tok, knowns, out, config)  # continued: only the missing trace is computed
    assert all(f.stat().st_mtime_ns == t for f, t in stamps.items() if f != files[0]) and files[0].is_file()
    with pytest.raises(InputError, match="other parameters"):
        trace_dataset(model, tok, knowns, out, TraceConfig(kinds=("hidden",), samples=3))
    trace_dataset(model, tok, knowns, out, TraceConfig(kinds=("hidden", "mlp"), samples=3, window=2, limit=1))  # fewer facts: fine

    averages = summarize_traces(out, kinds=("hidden", "mlp"), plots=1)
    hidden = averages["hidden"]
    assert hidden["positions"] == list(POSITIONS) and hidden["num_traces"] == 3
    # By hand: the effect at the last token, last layer, is the mean of (clean − corrupted).
    traces = [json.loads(p.read_text()) for p in sorted((out / "traces").glob("*_hidden.json"))]
    expected = sum(t["scores"][-1][-1] - t["low"] for t in traces) / 3
    assert hidden["effect"]["last"][-1] == pytest.approx(expected, abs=1e-6)
    for name in ("average.json", "average_hidden.png", "average_mlp.png", "last_subject_token.png"):
        assert (out / name).stat().st_size > 0
    assert len(list((out / "heatmaps").glob("*.png"))) == 2


def test_a_fact_asked_in_the_chat_template_is_traced_in_the_user_turn(tiny, tmp_path):
    model, tok, _ = tiny
    knowns = load_knowns(_knowns_file(tmp_path, model, tok))[:1]
    out = tmp_path / "chat"
    trace_dataset(model, tok, knowns, out, TraceConfig(kinds=("hidden",), samples=2, known_only=False, chat_template=True))
    trace = json.loads((out / "traces" / "0_hidden.json").read_text())
    user_turn = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    assert trace["prompt"] == user_turn and user_turn.endswith("<|im_start|>assistant\n")
    start, end = trace["subject_range"]
    assert "".join(trace["tokens"][start:end]).strip() == SUBJECT
    # The answer is the model's first token of the reply, read after the whole template.
    ids = torch.tensor([tok(user_turn)["input_ids"]])
    assert trace["answer_id"] == int(model(input_ids=ids).logits[0, -1].argmax())
    assert len(trace["tokens"]) == ids.shape[1]
    # A folder traced in the chat template is not continued without it.
    with pytest.raises(InputError, match="other parameters"):
        trace_dataset(model, tok, knowns, out, TraceConfig(kinds=("hidden",), samples=2, known_only=False))


def test_position_rows_cover_every_token():
    trace_tokens = ["The", " E", "iff", "el", " Tower", " is", " in", " the", " city"]
    trace = Trace("p", "s", "hidden", 1, trace_tokens, (1, 5), " Paris", 0, 1.0, 0.0, [])
    rows = position_rows(trace)
    assert rows["first subject"] == [1] and rows["middle subject"] == [2, 3] and rows["last subject"] == [4]
    assert rows["first after"] == [5] and rows["further after"] == [6, 7] and rows["last"] == [8]


def test_bad_knowns_file_names_the_field(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps([{"known_id": 0, "subject": "A", "prompt": "B is", "attribute": "c"}]))
    with pytest.raises(InputError, match="record 0: field 'prompt' does not contain the subject"):
        load_knowns(path)


def test_cli_trace(tiny, tmp_path):
    model, tok, _ = tiny
    folder = tmp_path / "tiny-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    knowns = _knowns_file(tmp_path, model, tok)
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["trace", "--model", str(folder), "--data-file", str(knowns), "--limit", "2",
                                       "--kinds", "hidden,attn", "--samples", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "last subject" in result.output and (out / "last_subject_token.png").is_file()
    assert json.loads((out / "params.json").read_text())["traced_known_ids"] == [0, 1]
    bad = CliRunner().invoke(main, ["trace", "--model", str(folder), "--data-file", str(knowns), "--kinds", "mlp,nope", "--out", str(out)])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_known_facts_batched_equal_one_at_a_time(tiny, tmp_path):
    from memit.tracing.run import known_facts

    model, tok, _ = tiny
    knowns = load_knowns(_knowns_file(tmp_path, model, tok))
    assert [k.known_id for k in known_facts(model, tok, knowns, batch_size=4)] == [0, 1, 2]
    assert known_facts(model, tok, knowns, batch_size=4) == [k for k in knowns if known_facts(model, tok, [k])]
