from __future__ import annotations

from dataclasses import dataclass

from memit.editing.hparams import CovarianceParams, HyperParamsError, SequentialParams, ZOptimizationParams


@dataclass
class AlphaEditHyperParams(SequentialParams, CovarianceParams, ZOptimizationParams):
    """AlphaEdit (Fang et al., ICLR 2025): MEMIT's targets and layer spreading, with each
    update projected onto the null space of the preserved keys' second moment."""

    algorithm = "AlphaEdit"

    # Eigenvalues of the key second moment below this span the null space that updates stay in.
    nullspace_threshold: float = 2e-2
    # Ridge term of the projected solve.
    L2: float = 10.0

    def validate(self) -> None:
        """Raises ``HyperParamsError`` naming the hyperparameter whose value is out of range."""
        super().validate()
        if self.nullspace_threshold <= 0:
            raise HyperParamsError("hyperparameter 'nullspace_threshold' must be positive")
        if self.L2 < 0:
            raise HyperParamsError("hyperparameter 'L2' must be non-negative")
