from __future__ import annotations

from dataclasses import dataclass, field

from memit.editing.hparams import HyperParams, HyperParamsError


@dataclass
class ZOptimizationParams(HyperParams):
    """The target-vector optimisation shared by MEMIT, ROME and AlphaEdit (names as in the paper's code)."""

    layers: list[int]
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    fact_token: str = "subject_last"
    # Generated context prefixes: for each [length, count], count prefixes of length tokens.
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    # The paper's module names; taken from the model's architecture when absent.
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None

    def validate(self) -> None:
        self.check_layers()
        if self.fact_token != "subject_last":
            raise HyperParamsError(f"hyperparameter 'fact_token': only 'subject_last' is supported, got {self.fact_token!r}")
        self.check_positive("v_num_grad_steps", "v_lr", "clamp_norm_factor")


@dataclass
class CovarianceParams:
    """Where the key second moment comes from."""

    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    # Tokens kept per corpus sample; None keeps the model's context length as the paper does.
    mom2_max_tokens: int | None = None


@dataclass
class MEMITHyperParams(CovarianceParams, ZOptimizationParams):
    algorithm = "MEMIT"

    mom2_update_weight: float = 15000.0
    mom2_adjustment: bool = True
    layer_selection: str = "all"

    def validate(self) -> None:
        super().validate()
        if self.mom2_update_weight < 0:
            raise HyperParamsError("hyperparameter 'mom2_update_weight' must be non-negative")
        if self.mom2_dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise HyperParamsError(f"hyperparameter 'mom2_dtype': unknown dtype {self.mom2_dtype!r}")
