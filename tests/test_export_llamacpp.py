"""The exported GGUF run by llama.cpp itself, through xllamacpp: a llama.cpp binding that PyPI
serves as a prebuilt CPU wheel (llama-cpp-python is served only as source there, and builds
llama.cpp at install). Without xllamacpp this module is skipped and the GGUF export is tested
through transformers' GGUF loader only (tests/test_export.py)."""
from __future__ import annotations

import dataclasses

import pytest

from memit import edit_model
from memit.models.loading import _packaged_default_gguf
from memit.predict import top_next_tokens

xllamacpp = pytest.importorskip(
    "xllamacpp", reason="the llama.cpp binding xllamacpp is not installed (pip install xllamacpp); "
    "the exported GGUF is then checked through transformers only"
)

REQUESTS = [
    {"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": {"str": "football"}, "target_true": {"str": "basketball"}},
    {"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
]
PROMPTS = [r["prompt"].format(r["subject"]) for r in REQUESTS]


def next_tokens(gguf_file, prompts):
    """llama.cpp's greedy next token after each prompt (one thread, no sampling)."""
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_file)
    params.n_ctx = 128
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    server = xllamacpp.Server(params)
    try:
        return [
            server.handle_completions({"prompt": p, "max_tokens": 1, "temperature": 0, "n_probs": 1})["choices"][0]["text"]
            for p in prompts
        ]
    finally:
        del server


def test_llama_cpp_reads_the_new_targets_from_the_exported_gguf(default_model, default_hparams, tmp_path):
    model, tok = default_model
    base = _packaged_default_gguf()
    deltas = edit_model(model, tok, REQUESTS, dataclasses.replace(default_hparams, v_num_grad_steps=10))
    try:
        edited = [top_next_tokens(model, tok, p, k=1)[0][0] for p in PROMPTS]
        # Q8_0: re-quantising the edited tensors as the base's Q4_1 would round the edit away.
        deltas.export(tmp_path / "gguf", "gguf", model=model, base=base, edited_type="q8_0")
    finally:
        deltas.revert(model)
    assert edited == [" football", " Rome"]
    assert next_tokens(tmp_path / "gguf" / base.name, PROMPTS) == edited
    # The base file, run the same way, does not say them: the edit is what changed.
    assert not set(next_tokens(base, PROMPTS)) & set(edited)
