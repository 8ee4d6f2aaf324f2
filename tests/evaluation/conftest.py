"""Fixtures for the evaluation tests: a tiny random Llama with the default model's tokenizer."""
from __future__ import annotations

import pytest

from ..conftest import random_llama


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return random_llama(tokenizer, num_layers=2, seed=1234, max_position_embeddings=512)


@pytest.fixture(scope="session")
def cf_case():
    record = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
        },
        "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak", "Danielle Darrieux was born in"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of", "The mother tongue of Thomas Joannes is", "Jean Vilar speaks"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
    from memit.evaluation.datasets import parse_records

    return parse_records([record], "cf")[0]
