from __future__ import annotations

from dataclasses import dataclass

from memit.editing.hparams import HyperParams, HyperParamsError


@dataclass
class FTHyperParams(HyperParams):
    """Fine-tuning of the MLP output projection(s) of ``layers`` on the rewrite prompts (the
    papers' FT baselines). With ``weight_decay`` (or ``wd_power_law``) and no norm bound this
    is FT-W; ``norm_constraint`` keeps every weight within ± that value of its start (FT-L)."""

    algorithm = "FT"

    layers: list[int]
    num_steps: int
    lr: float
    weight_decay: float = 0.0
    # [a, b]: weight decay n**a * exp(b) for n requests (the MEMIT paper's FT-W); overrides weight_decay.
    wd_power_law: list[float] | None = None
    # L∞ bound on the change of each weight; None leaves the weights unbounded.
    norm_constraint: float | None = None
    batch_size: int = 64
    # The paper's module names; taken from the model's architecture when absent.
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None

    def validate(self) -> None:
        """Raises ``HyperParamsError`` naming the hyperparameter whose value is out of range."""
        self.check_layers()
        self.check_positive("num_steps", "lr", "batch_size")
        if self.weight_decay < 0:
            raise HyperParamsError("hyperparameter 'weight_decay' must be non-negative")
        if self.wd_power_law is not None and len(self.wd_power_law) != 2:
            raise HyperParamsError(f"hyperparameter 'wd_power_law' must be [exponent, log scale], got {self.wd_power_law}")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise HyperParamsError("hyperparameter 'norm_constraint' must be positive (or null for no bound)")

    def decay_for(self, n_requests: int) -> float:
        """The Adam weight decay for a batch of ``n_requests`` edits."""
        if self.wd_power_law is None:
            return self.weight_decay
        exponent, log_scale = self.wd_power_law
        return float(n_requests**exponent * 2.718281828459045**log_scale)


@dataclass
class FTLHyperParams(FTHyperParams):
    """FT-L: fine-tuning with the L∞ norm constraint (ROME paper's FT+L)."""

    algorithm = "FT-L"

    def validate(self) -> None:
        """Raises ``HyperParamsError`` naming the hyperparameter whose value is out of range."""
        super().validate()
        if self.norm_constraint is None:
            raise HyperParamsError("hyperparameter 'norm_constraint' is required for FT-L (use FT for unbounded fine-tuning)")
