"""Where the decoder layers and MLP output projections sit in a causal LM, found from the model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from memit.errors import InputError

# Names of the MLP output projection across architectures, most common first.
_MLP_OUT_NAMES = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2", "out_proj")
_MLP_CONTAINERS = ("mlp", "feed_forward", "ffn")
# A norm applied to the MLP output before the residual add: the MLP output is then not
# what reaches the residual stream, and MEMIT's linear-associative-memory view breaks.
_POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffn_layernorm")


class UnsupportedArchitectureError(InputError):
    pass


@dataclass(frozen=True)
class ModelLayout:
    """Module names for one model: ``layer_tmp.format(i)`` is decoder layer i, and
    ``mlp_out_tmp.format(i)`` its MLP output projection (the matrix that MEMIT edits)."""

    layer_tmp: str
    mlp_out_tmp: str
    num_layers: int
    # GPT-2's Conv1D stores its weight as (in, out), the transpose of nn.Linear.
    transposed_weight: bool

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, layer_tmp: str | None = None, mlp_out_tmp: str | None = None
    ) -> "ModelLayout":
        """Detect the layout, or check explicit module templates (as in the paper's presets)."""
        modules = dict(model.named_modules())
        layers_name = layer_tmp.removesuffix(".{}") if layer_tmp else _find_layer_list(model)
        layers = modules.get(layers_name)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedArchitectureError(f"layer_module_tmp: {layers_name!r} is not a list of layers in this model")
        layer_tmp = layers_name + ".{}"
        _check_residual_mlp(layers[0], type(model).__name__)
        if mlp_out_tmp is None:
            mlp_out_tmp = layer_tmp + "." + _find_mlp_out(layers[0], type(model).__name__)
        out = modules.get(mlp_out_tmp.format(0))
        if not isinstance(out, (nn.Linear, Conv1D)):
            raise UnsupportedArchitectureError(
                f"rewrite_module_tmp: {mlp_out_tmp!r} is not a linear layer in {type(model).__name__}"
            )
        return cls(layer_tmp, mlp_out_tmp, len(layers), isinstance(out, Conv1D))

    def layer_name(self, layer: int) -> str:
        """The module name of transformer block ``layer`` (``model.layers.5``)."""
        return self.layer_tmp.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        """The module name of block ``layer``'s MLP output projection, the matrix MEMIT edits."""
        return self.mlp_out_tmp.format(layer)

    def weight_name(self, layer: int) -> str:
        """The parameter name of that projection's weight, as deltas are keyed."""
        return self.mlp_out_name(layer) + ".weight"

    def mlp_out(self, model: nn.Module, layer: int) -> nn.Module:
        """Block ``layer``'s MLP output projection module of ``model``."""
        return model.get_submodule(self.mlp_out_name(layer))

    def layer(self, model: nn.Module, layer: int) -> nn.Module:
        """Transformer block ``layer`` of ``model``."""
        return model.get_submodule(self.layer_name(layer))

    def check_layers(self, layers: list[int], field: str = "layers") -> None:
        """Raises ``InputError`` naming ``field`` if a layer index is outside the model."""
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise InputError(f"{field}: layer(s) {bad} outside this model's 0..{self.num_layers - 1}")

    def as_weight(self, update: torch.Tensor) -> torch.Tensor:
        """Turn an (out, in) update into the weight's own orientation."""
        return update.T if self.transposed_weight else update


def _find_layer_list(model: PreTrainedModel) -> str:
    want = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (want is None or len(mod) == want)
    ]
    if not candidates:
        raise UnsupportedArchitectureError(f"no list of decoder layers found in {type(model).__name__}")
    # The decoder stack is the outermost such list (vision towers or experts nest deeper).
    return min(candidates, key=lambda item: item[0].count("."))[0]


def _check_residual_mlp(layer: nn.Module, arch: str) -> None:
    names = {name.split(".")[-1] for name, _ in layer.named_modules()}
    hit = names.intersection(_POST_MLP_NORMS)
    if hit:
        raise UnsupportedArchitectureError(
            f"{arch} normalises the MLP output ({sorted(hit)[0]}) before adding it to the residual stream; "
            "MEMIT's update assumes the MLP output is added to the residual stream directly"
        )


def _find_mlp_out(layer: nn.Module, arch: str) -> str:
    for container in _MLP_CONTAINERS:
        mlp = getattr(layer, container, None)
        if mlp is None:
            continue
        for out_name in _MLP_OUT_NAMES:
            if isinstance(getattr(mlp, out_name, None), (nn.Linear, Conv1D)):
                return f"{container}.{out_name}"
    raise UnsupportedArchitectureError(
        f"no MLP output projection found in {arch}; pass rewrite_module_tmp in the hyperparameters"
    )
