"""What differs between the supported transformers releases (4.46 to 5.x), in one place.

scripts/compat.sh runs the tiny-architecture tests under the oldest; CI under the pinned newest.
"""
from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import transformers
from transformers import DynamicCache

# (major, minor) of the installed transformers, e.g. (4, 46).
TRANSFORMERS_VERSION = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])


def dtype_kwargs(dtype: torch.dtype | str | None) -> dict:
    """``from_pretrained``'s dtype keyword: ``torch_dtype`` before transformers 4.56."""
    return {"dtype" if TRANSFORMERS_VERSION >= (4, 56) else "torch_dtype": dtype}


def gguf_dequantize_kwargs() -> dict:
    """``from_pretrained`` keywords that unpack a GGUF file into plain floating-point weights.

    Releases with ``GgufConfig`` keep GGUF weights in their blocks unless told to dequantize;
    older releases always dequantize.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _tuple_cache_only(model: Any) -> bool:
    # Before transformers 4.5x some architectures (GPT-2 in 4.46) took only a tuple of
    # (keys, values) per layer; the others said so with _supports_cache_class.
    return getattr(model, "_supports_cache_class", True) is False


def empty_cache(model: Any) -> DynamicCache | None:
    """A cache for a forward pass with ``use_cache=True`` to fill (None: the model makes tuples)."""
    return None if _tuple_cache_only(model) else DynamicCache()


def cache_from_pairs(model: Any, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """A fresh cache over each layer's ``(keys, values)``, as the model's forward takes it."""
    if _tuple_cache_only(model):
        return tuple(pairs)
    if "ddp_cache_data" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(ddp_cache_data=pairs)
    return DynamicCache.from_legacy_cache(tuple(pairs))


def cache_pairs(cache: Iterable) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(keys, values)`` from a cache or a tuple of them."""
    return [(layer[0], layer[1]) for layer in cache]


def last_logits_only(model: Any) -> dict:
    """Forward keywords that compute the vocabulary head at the last position only:
    ``logits_to_keep`` from transformers 4.50, ``num_logits_to_keep`` before (where the
    architecture takes it), else none (all positions)."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


@contextlib.contextmanager
def contiguous_head_input(model: Any) -> Iterator[None]:
    """Inside the block, the vocabulary head reads a contiguous copy of its input. With
    ``logits_to_keep`` a batch's last positions reach the head as a strided slice, and
    torch's CPU product of a strided input with a weight that needs no gradient (a frozen
    model) takes a slow path: 400 times the contiguous product's time in bfloat16 at width
    2,048 (9 s against 22 ms for 13 rows), 2-4 times in float32."""
    head = model.get_output_embeddings()
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def replayed_layer_output(hidden: torch.Tensor, kwargs: dict) -> tuple:
    """A decoder layer's tuple output. Before transformers 4.5x, models read a layer's cache
    from the tuple's second element when ``use_cache``: hand back the cache it was given."""
    return hidden, kwargs.get("past_key_value", kwargs.get("layer_past"))


def set_attn_implementation(model: Any, name: str) -> bool:
    """Switch the attention implementation; False where the release fixes it at load time."""
    if not hasattr(model, "set_attn_implementation"):
        return False
    model.set_attn_implementation(name)
    return True


def gguf_fixes(model: Any, tok: Any, gguf_path: Any) -> None:
    """Set from a GGUF file what transformers 4.x did not read from it: 4.46 left the
    vocabulary head untied (and random) when the file has no ``output.weight``, added a BOS
    token where the file says not to, and took the wrong EOS and no padding token."""
    if TRANSFORMERS_VERSION >= (5, 0):
        return
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def scalar(name: str) -> Any:
        field = reader.fields.get(name)
        return None if field is None else field.parts[field.data[0]][0].item()

    if not model.config.tie_word_embeddings and "output.weight" not in {t.name for t in reader.tensors}:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    add_bos = scalar("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = scalar(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(int(token_id)))
