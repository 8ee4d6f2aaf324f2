"""Module layouts found from the architecture, and a real MEMIT edit on tiny random models."""
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from memit import MEMITHyperParams, ModelLayout, edit_model
from memit.models import UnsupportedArchitectureError
from memit.predict import score_continuations

VOCAB = 49152  # the default model's tokenizer serves every tiny model
SMALL = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)

CONFIGS = {
    "gpt2": (GPT2Config(n_layer=4, n_embd=64, n_head=4, **SMALL), "transformer.h.{}", "transformer.h.{}.mlp.c_proj", True),
    "gptj": (GPTJConfig(n_layer=4, n_embd=64, n_head=4, rotary_dim=8, **SMALL), "transformer.h.{}", "transformer.h.{}.mlp.fc_out", False),
    "gpt_neox": (
        GPTNeoXConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128, **SMALL),
        "gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h", False,
    ),
    "llama_tied": (
        LlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True, **SMALL),
        "model.layers.{}", "model.layers.{}.mlp.down_proj", False,
    ),
    "mistral": (
        MistralConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, **SMALL),
        "model.layers.{}", "model.layers.{}.mlp.down_proj", False,
    ),
    "qwen2_untied": (
        Qwen2Config(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False, **SMALL),
        "model.layers.{}", "model.layers.{}.mlp.down_proj", False,
    ),
}

# In a random model little flows between positions, so the subject ends the prompt: its last
# token is where the delta is written and where the target is predicted.
REQUEST = {"prompt": "The sport played by {}", "subject": "LeBron James", "target_new": "football"}
PROMPT = "The sport played by LeBron James"


def tiny(name: str):
    torch.manual_seed(0)
    config = CONFIGS[name][0]
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_hparams() -> MEMITHyperParams:
    return MEMITHyperParams(
        layers=[1, 2], v_num_grad_steps=15, v_lr=0.5, v_weight_decay=1e-3,
        clamp_norm_factor=20.0, kl_factor=0.0625, mom2_n_samples=20, mom2_max_tokens=64,
        mom2_update_weight=100.0, context_template_length_params=[[5, 2]], mom2_dataset="wikipedia-sample",
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_layout_is_found_from_the_architecture(name):
    _, layer_tmp, mlp_out_tmp, transposed = CONFIGS[name]
    layout = ModelLayout.from_model(tiny(name))
    assert (layout.layer_tmp, layout.mlp_out_tmp, layout.transposed_weight) == (layer_tmp, mlp_out_tmp, transposed)
    assert layout.num_layers == 4


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
def test_memit_raises_target_probability_on_each_architecture(name, fast, default_model, tmp_path):
    _, tok = default_model
    model = tiny(name)
    before = score_continuations(model, tok, [PROMPT], [" football"])[0].mean_nll
    original = {k: v.clone() for k, v in model.state_dict().items()}
    deltas = edit_model(model, tok, [REQUEST], tiny_hparams(), stats_dir=str(tmp_path), fast=fast)
    after = score_continuations(model, tok, [PROMPT], [" football"])[0].mean_nll
    # Tiny random embeddings bound how far any logit can move, so the bar is modest.
    assert after < before - 0.5
    assert set(deltas.deltas) == {ModelLayout.from_model(model).weight_name(i) for i in (1, 2)}
    deltas.revert(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shared_prompt_scoring_equals_joined_sequences_on_each_architecture(name, default_model):
    """Prompts run once with their keys and values reused for every continuation (left-padded,
    batched by length) give the paper's joined-sequence scores."""
    _, tok = default_model
    model = tiny(name)
    prompts = [PROMPT, PROMPT, "Paris is the capital of", "Paris is the capital of", "A"]
    continuations = [" football", " basketball game", " France", " the United Kingdom", " b"]
    shared = score_continuations(model, tok, prompts, continuations, batch_size=2)
    joined = score_continuations(model, tok, prompts, continuations, shared_prompts=False)
    for a, b in zip(shared, joined):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
        assert a.argmax_matches == b.argmax_matches


def test_post_feedforward_norm_is_refused():
    try:
        from transformers import Gemma3TextConfig as GemmaConfig
    except ImportError:  # transformers < 4.50 (scripts/compat.sh): Gemma 2 has the same norm
        from transformers import Gemma2Config as GemmaConfig
    config = GemmaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, head_dim=16, vocab_size=1000)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="post_feedforward_layernorm"):
        ModelLayout.from_model(model)


def test_layer_outside_the_model_is_named():
    layout = ModelLayout.from_model(tiny("llama_tied"))
    with pytest.raises(ValueError, match=r"layers: layer\(s\) \[7\] outside this model's 0..3"):
        layout.check_layers([1, 7])


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("budget_bytes", [2**30, 0])
def test_keys_across_edits_equal_keys_computed_from_the_embeddings(name, budget_bytes, default_model):
    """Resuming from the residual stream kept below the last layer read gives the keys of a
    whole forward pass, bit for bit, after each layer's weights have changed."""
    from memit.editing.keys import KeysAcrossEdits, compute_keys
    from memit.requests import parse_requests

    _, tok = default_model
    model = tiny(name)
    layout = ModelLayout.from_model(model)
    requests = parse_requests([REQUEST, {**REQUEST, "subject": "Serena Williams"}])
    templates = [["{}"], ["The news. {}", "In short, {}"]]
    reader = KeysAcrossEdits(model, tok, layout, requests, templates, budget_bytes=budget_bytes, batch_size=4)
    for layer in (1, 3, 2):  # 2 after 3: read again from the embeddings
        keys = reader.at(layer)
        assert torch.equal(keys, compute_keys(model, tok, layout, requests, layer, templates))
        with torch.no_grad():
            layout.mlp_out(model, layer).weight.add_(torch.randn_like(layout.mlp_out(model, layer).weight))
