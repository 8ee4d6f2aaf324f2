from __future__ import annotations

from dataclasses import dataclass

from memit.editing.hparams import CovarianceParams, ZOptimizationParams


@dataclass
class ROMEHyperParams(CovarianceParams, ZOptimizationParams):
    """ROME (Meng et al. 2022a): a rank-one update of one MLP output projection per request."""

    algorithm = "ROME"

    # Whiten the key with the inverse second moment (u = C⁻¹k); False uses the raw key.
    mom2_adjustment: bool = True
