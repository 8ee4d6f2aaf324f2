"""A data set is one description plus one table row: a tiny "qa" data set, registered in a
test, is loaded, detected, validated, downloaded by name, evaluated by a run, summarized
with its labels and turned into MEND training examples. And the editing layer never
imports the evaluation layer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from memit.editing.mend.train import TrainingExample
from memit.evaluation.datasets import (
    DATASETS,
    DEFAULT_DATASET,
    DatasetError,
    default_data_file,
    detect_schema,
    get_dataset,
    load_cases,
    register_dataset,
    training_examples,
)
from memit.evaluation.download import bundles, remote_files

from ..conftest import DATA_DIR
from .qa_dataset import QA, QaCase

RECORDS = [
    {"subject": "Danielle Darrieux", "prompt": "The mother tongue of Danielle Darrieux is", "answer": "French", "new_answer": "English"},
    {"subject": "Toko Yasuda", "prompt": "Toko Yasuda plays the", "answer": "guitar", "new_answer": "piano"},
    {"subject": "Paris", "prompt": "Paris is the capital of", "answer": "France", "new_answer": "Italy"},
]


@pytest.fixture
def qa():
    register_dataset(QA)
    yield QA
    DATASETS.pop(QA.name)


@pytest.fixture
def qa_file(tmp_path) -> Path:
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_a_registered_data_set_is_loaded_by_name_detected_and_found_in_the_data_folder(qa, qa_file):
    dataset, path, cases = load_cases(None, qa_file)
    assert dataset == "qa" and path == qa_file
    assert [type(c) for c in cases] == [QaCase] * 3
    assert cases[1].request.prompt == "{} plays the" and cases[1].request.target_new == " piano"
    assert cases[1].request.target_true == " guitar"
    assert load_cases("qa", qa_file)[2] == cases
    assert default_data_file("qa", qa_file.parent) == qa_file
    assert load_cases("qa", folder=qa_file.parent, limit=2)[2] == cases[:2]
    # The data sets before it in detection still win on their own files.
    assert detect_schema(json.loads((DATA_DIR / "counterfact_mend" / "counterfact-val.json").read_text())) == "cf-mend"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[2].pop("new_answer"), "record 2: missing field 'new_answer'"),
        (lambda r: r[1].update(prompt="no subject here"), "record 1: field 'prompt' does not contain the subject"),
        (lambda r: r[2].update(answer=7), "record 2: field 'answer' must be str"),
    ],
)
def test_bad_records_are_named_by_record_and_field(qa, tmp_path, mutate, message):
    records = json.loads(json.dumps(RECORDS))
    mutate(records)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DatasetError, match="qa schema") as err:
        load_cases("qa", path)
    assert message in str(err.value)
    with pytest.raises(DatasetError, match="closest is qa") as err:
        load_cases(None, path)
    assert message in str(err.value)


def test_unknown_data_set_names_the_field():
    with pytest.raises(DatasetError, match=r"^dataset: unknown data set 'nope'; choose one of cf, mcf, zsre, cf-mend"):
        get_dataset("nope")
    assert DEFAULT_DATASET in DATASETS


def test_download_knows_the_registered_files(qa):
    assert bundles()["qa"] == ("qa.json",)
    assert remote_files()["qa.json"] is QA.remote_files[0]
    assert list(bundles())[:3] == ["cf", "mcf", "zsre"] and "cf-mend" not in bundles()


def test_mend_training_examples_come_from_the_description(qa, qa_file):
    dataset, _, cases = load_cases(None, qa_file)
    examples = training_examples(cases, dataset)
    assert examples[0] == TrainingExample(
        ("The mother tongue of Danielle Darrieux is", " English"), ("The mother tongue of Danielle Darrieux is", " English"),
        "The capital of France is",
    )


def test_a_run_evaluates_the_registered_data_set(qa, qa_file, tiny_model, tokenizer, tmp_path):
    import torch

    from memit.editing.ft.hparams import FTHyperParams
    from memit.evaluation.runner import RunConfig, run_evaluation
    from memit.evaluation.summary import format_table, summarize_run

    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    config = RunConfig(alg="FT", dataset=None, data_file=str(qa_file), data_dir=str(tmp_path / "data"), out=str(tmp_path / "out"))
    run_dir = run_evaluation(config, tiny_model, tokenizer, FTHyperParams(layers=[1], num_steps=2, lr=1e-3))
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("case_*.json"))]
    assert [r["case_id"] for r in records] == [0, 1, 2]
    for record in records:
        for phase in ("pre", "post"):
            nll = record[phase]["qa_nll"]
            assert set(nll) == {"new", "true"}
            assert record[phase]["efficacy_success"] == float(nll["true"] > nll["new"])
            assert "fluency" not in record[phase]
    assert records[1]["requested_rewrite"]["target_new"] == {"str": " piano"}
    assert json.loads((run_dir / "params.json").read_text())["config"]["dataset"] == "qa"
    table = format_table(summarize_run(run_dir))
    assert "Answer flipped" in table and "Efficacy success" not in table
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
