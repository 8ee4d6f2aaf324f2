from __future__ import annotations

from dataclasses import dataclass

from memit.editing.hparams import CovarianceParams, HyperParamsError, ZOptimizationParams


@dataclass
class MEMITHyperParams(CovarianceParams, ZOptimizationParams):
    algorithm = "MEMIT"

    mom2_update_weight: float = 15000.0

    def validate(self) -> None:
        super().validate()
        if self.mom2_update_weight < 0:
            raise HyperParamsError("hyperparameter 'mom2_update_weight' must be non-negative")
