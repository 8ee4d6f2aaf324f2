"""Fixtures for the evaluation tests: a tiny random Llama with the default model's tokenizer."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer(default_model):
    return default_model[1]


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    # Larger logits make argmax decisions and probability gaps less uniform.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


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
