"""MQuAKE: loading its schema, its metrics by hand on a tiny model, its download entry against
a local server, and an edit of the default model through cases with several edits each."""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from memit.evaluation.datasets import DATASETS, DatasetError, MquakeCase, detect_schema, load_cases, parse_records, training_examples
from memit.evaluation.datasets.mquake import evaluate_mquake_case, mquake_probes
from memit.evaluation.download import download, git_blob_of, remote_files, remote_url
from memit.evaluation.runner import RunConfig, run_evaluation
from memit.predict import score_continuations

from .test_download import Handler

SAMPLE = Path(__file__).parent / "data" / "mquake_sample.json"


@pytest.fixture(scope="module")
def records():
    return json.loads(SAMPLE.read_text())


def test_loads_and_detects_the_schema(records):
    assert detect_schema(records) == "mquake"
    dataset, _, cases = load_cases(None, SAMPLE)
    assert dataset == "mquake" and [type(c) for c in cases] == [MquakeCase, MquakeCase]
    chain = cases[1]
    assert [r.subject for r in chain.requests] == ["France", "Lyon"] and chain.request is chain.requests[0]
    assert [r.target_new for r in chain.requests] == [" Lyon", " Asia"] and chain.requests[1].target_true == " Europe"
    assert all(r.case_id == 2 for r in chain.requests)
    assert chain.new_answer == "Asia" and chain.new_answer_aliases == ("Asian continent",) and len(chain.questions) == 3


def test_bad_records_name_the_field(records):
    broken = json.loads(json.dumps(records))
    del broken[1]["requested_rewrite"][1]["target_true"]
    with pytest.raises(DatasetError, match=r"record 1: missing field 'requested_rewrite\[1\].target_true'"):
        parse_records(broken, "mquake")
    broken = json.loads(json.dumps(records))
    del broken[0]["requested_rewrite"][0]["question"]
    with pytest.raises(DatasetError, match=r"record 0: missing field 'requested_rewrite\[0\].question'"):
        parse_records(broken, "mquake")
    with pytest.raises(DatasetError, match="record 0: field 'questions' is empty"):
        parse_records([{**records[0], "questions": []}], "mquake")
    with pytest.raises(DatasetError, match="no MEND training examples"):
        training_examples(parse_records(records, "mquake"), "mquake")


def test_metrics_by_hand(tiny_model, tokenizer, records):
    case = parse_records(records, "mquake")[1]
    got = evaluate_mquake_case(tiny_model, tokenizer, case)
    # Multi-hop: the new answer preferred after any of the three phrasings.
    questions = list(case.questions)
    new = score_continuations(tiny_model, tokenizer, questions, [" Asia"] * 3)
    old = score_continuations(tiny_model, tokenizer, questions, [" Europe"] * 3)
    assert got["multihop_success"] == float(any(n.mean_nll < o.mean_nll for n, o in zip(new, old)))
    # Efficacy: the share of the chain's edits whose cloze statement prefers the new target.
    prompts = [r.filled_prompt() for r in case.requests]
    new = score_continuations(tiny_model, tokenizer, prompts, [" Lyon", " Asia"])
    old = score_continuations(tiny_model, tokenizer, prompts, [" Paris", " Europe"])
    assert got["efficacy_success"] == sum(n.mean_nll < o.mean_nll for n, o in zip(new, old)) / 2
    assert [p["prompt"] for p in got["prompts"]["paraphrase"]] == list(case.edit_questions)
    probes = mquake_probes(case)
    assert [p.group for p in probes] == ["efficacy"] * 2 + ["paraphrase"] * 2 + ["multihop"] * 3
    assert probes[-1].answers == ("Asia", "Asian continent")


def test_download_entry_fetches_both_files_from_a_mirror(tmp_path, monkeypatch):
    # The real files are pinned to their git blob; the mirror serves the sample under their names.
    blob = git_blob_of(SAMPLE)
    mquake = DATASETS["mquake"]
    monkeypatch.setitem(DATASETS, "mquake", dataclasses.replace(
        mquake, remote_files=tuple(dataclasses.replace(f, git_blob=blob) for f in mquake.remote_files)))
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in ("MQuAKE-CF-3k.json", "MQuAKE-T.json"):
        shutil.copy(SAMPLE, mirror / name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(mirror)))
    httpd.requests, httpd.corrupt, httpd.ranges, httpd.break_after = [], False, True, None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        paths = download(["mquake"], tmp_path / "data", base_url=f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [p.name for p in paths] == ["MQuAKE-CF-3k.json", "MQuAKE-T.json"]
    assert load_cases("mquake", folder=tmp_path / "data")[1] == tmp_path / "data" / "MQuAKE-CF-3k.json"
    # Without a mirror, MQuAKE comes from its own repository, the others from the paper's host.
    assert remote_url(remote_files()["MQuAKE-T.json"]).startswith("https://raw.githubusercontent.com/princeton-nlp/MQuAKE/")
    assert remote_url(remote_files()["known_1000.json"]).startswith("https://memit.baulab.info/")


def test_cases_with_several_edits_are_edited_and_scored(default_model, default_hparams, tmp_path):
    model, tok = default_model
    config = RunConfig(dataset="mquake", data_file=str(SAMPLE), num_edits=2, out=str(tmp_path))
    edited: list = []
    from memit.evaluation.runner import RunHooks

    run_dir = run_evaluation(config, model, tok, default_hparams, hooks=RunHooks(on_edit=edited.append))
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("case_*.json"))]
    assert len(records) == 2 and len(records[1]["requested_rewrites"]) == 2
    saved = json.loads((run_dir / "params.json").read_text())
    assert saved["config"]["dataset"] == "mquake"
    # Three edits in one batch: every edited cloze statement now prefers its new target.
    assert [r["post"]["efficacy_success"] for r in records] == [1.0, 1.0]
    assert sum(r["pre"]["efficacy_success"] for r in records) < 2
    assert {"multihop_success", "gen_multihop", "gen_multihop_em", "gen_efficacy"} <= records[1]["post"].keys()
