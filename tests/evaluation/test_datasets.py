"""Loaders of the four schemas, schema detection and errors naming the record and field."""
from __future__ import annotations

import json

import pytest

from memit.evaluation.datasets import (
    CounterFactCase,
    DatasetError,
    ZsreCase,
    default_data_file,
    detect_schema,
    load_cases,
    parse_records,
)

from ..conftest import DATA_DIR


def test_counterfact_subset():
    dataset, _, cases = load_cases("cf", DATA_DIR / "counterfact_subset400.json")
    assert dataset == "cf" and len(cases) == 400
    case = cases[0]
    assert isinstance(case, CounterFactCase)
    assert case.request.prompt == "{}, created by" and case.request.subject == "Porsche 911"
    assert case.request.target_new == " Honda" and case.request.target_true == " Porsche"
    assert len(case.paraphrase_prompts) == 2 and len(case.neighborhood_prompts) == 10
    assert len(case.generation_prompts) == 10 and case.relation_id == "P176" and case.target_new_id == "Q9584"


def test_zsre_maps_alt_and_subject_template():
    dataset, _, cases = load_cases(None, DATA_DIR / "zsre_mend_eval_subset700.json", limit=5)
    assert dataset == "zsre" and len(cases) == 5
    case = cases[0]
    assert isinstance(case, ZsreCase)
    assert case.request.prompt == "When was the inception of {}?"
    assert case.request.target_new == " 2006"
    assert case.loc.startswith("nq question: ") and case.loc_ans == "The String"


def test_reduced_counterfact_replaces_subject():
    dataset, _, cases = load_cases(None, DATA_DIR / "counterfact_mend" / "counterfact-edit.json", limit=2)
    assert dataset == "cf-mend"
    case = cases[0]
    assert case.request.prompt == "The mother tongue of {} is" and case.request.target_true == " French"
    assert case.paraphrase_prompts == ["Where Danielle Darrieux is from, people speak the language of"]
    assert case.neighborhood_prompts == ["Michel Rocard is a native speaker of"]
    # Fluency is generated from the edit prompt and the rephrase (the files have no generation prompts).
    assert case.generation_prompts == ["The mother tongue of Danielle Darrieux is", case.paraphrase_prompts[0]]


def test_full_and_reduced_counterfact_agree():
    full = {c.case_id: c for c in load_cases("cf", DATA_DIR / "counterfact_subset400.json")[2]}
    reduced = load_cases("cf-mend", DATA_DIR / "counterfact_mend" / "counterfact-edit.json")[2]
    shared = [c for c in reduced if c.case_id in full][:20]
    assert shared
    for c in shared:
        assert c.request.prompt == full[c.case_id].request.prompt
        assert c.neighborhood_prompts[0] in full[c.case_id].neighborhood_prompts


@pytest.mark.parametrize(
    ("dataset", "mutate", "message"),
    [
        ("cf", lambda r: r[3].pop("paraphrase_prompts"), "record 3: missing field 'paraphrase_prompts'"),
        ("cf", lambda r: r[2]["requested_rewrite"].update(prompt="no slot"), "record 2: field 'requested_rewrite.prompt'"),
        ("cf", lambda r: r[1]["requested_rewrite"]["target_new"].pop("str"), "record 1: field 'requested_rewrite.target_new'"),
        ("cf", lambda r: r[4].update(neighborhood_prompts=["ok", 5]), "record 4: field 'neighborhood_prompts[1]'"),
        ("zsre", lambda r: r[2].update(src="nothing here"), "record 2: field 'src' does not contain the subject"),
        ("zsre", lambda r: r[0].pop("alt"), "record 0: missing field 'alt'"),
        ("cf-mend", lambda r: r[1].update(target_new=3), "record 1: field 'target_new' must be str"),
    ],
)
def test_bad_records_are_named(dataset, mutate, message):
    files = {"cf": "counterfact_subset400.json", "zsre": "zsre_mend_eval_subset700.json", "cf-mend": "counterfact_mend/counterfact-val.json"}
    records = json.loads((DATA_DIR / files[dataset]).read_text())[:6]
    mutate(records)
    with pytest.raises(DatasetError) as err:
        parse_records(records, dataset)
    assert message in str(err.value)


def test_detection_names_the_closest_schema(tmp_path):
    records = json.loads((DATA_DIR / "counterfact_subset400.json").read_text())[:5]
    del records[3]["neighborhood_prompts"]
    with pytest.raises(DatasetError, match=r"closest is cf: record 3: missing field 'neighborhood_prompts'"):
        detect_schema(records)
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_cases("cf", path)


def test_duplicate_case_ids_and_missing_default_file(tmp_path):
    records = json.loads((DATA_DIR / "counterfact_subset400.json").read_text())[:2]
    records[1]["case_id"] = records[0]["case_id"]
    with pytest.raises(DatasetError, match="record 1: field 'case_id'"):
        parse_records(records, "cf")
    with pytest.raises(FileNotFoundError, match="memit download cf"):
        default_data_file("cf", tmp_path)
