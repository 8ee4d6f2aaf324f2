from __future__ import annotations

from dataclasses import dataclass

from memit.editing.hparams import CovarianceParams, HyperParamsError, SequentialParams, ZOptimizationParams


@dataclass
class MEMITHyperParams(SequentialParams, CovarianceParams, ZOptimizationParams):
    """MEMIT, and the sequential-editing refinements of its solve (off by default: the paper's MEMIT)."""

    algorithm = "MEMIT"

    mom2_update_weight: float = 15000.0
    # Weight w of the keys of the edits made earlier on this model in the solve (MEMIT-seq,
    # arXiv 2605.26670): ΔW = R Kᵀ (λC + w·Σ K_prev K_prevᵀ + K Kᵀ + λₙ I)⁻¹, so that a batch
    # leaves the outputs of earlier edits' keys where they were. 0 ignores earlier edits.
    preserve_weight: float = 0.0
    # λₙ: a penalty on the update's norm (ENCORE, arXiv 2502.01636).
    norm_constraint: float = 0.0
    # Up to this many earlier edits that no longer hold (greedy decoding after their prompt
    # does not give their new target: memit.editing.lapsed) written again with each batch,
    # the narrowest misses first, their keys taken out of the preserved term for that solve and
    # kept again with the batch (an edit written again weighs more in later solves); 0: only the batch.
    rewrite_lapsed: int = 0

    def validate(self) -> None:
        """Raises ``HyperParamsError`` naming the hyperparameter whose value is out of range."""
        super().validate()
        for name in ("mom2_update_weight", "preserve_weight", "norm_constraint", "rewrite_lapsed"):
            if getattr(self, name) < 0:
                raise HyperParamsError(f"hyperparameter '{name}' must be non-negative, got {getattr(self, name)}")
