"""The model shapes of the real-size benchmarks (benchmarks/scale_gpu.py and its run of the
paper's code, benchmarks/scale_gpu_reference.py): real configurations, built with random
weights; the vocabulary is the default model's tokenizer's."""
from __future__ import annotations

from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "gptj-6b": dict(model_type="gptj", n_embd=4096, n_inner=16384, n_layer=28, n_head=16, rotary_dim=64, n_positions=2048),
}
