from __future__ import annotations

from dataclasses import dataclass

from memit.editing.hparams import HyperParams


@dataclass
class MENDHyperParams(HyperParams):
    """MEND (Mitchell et al., ICLR 2022): a small network trained to turn the fine-tuning
    gradient of an edit into a weight change of the MLP output projections of ``layers``.
    Editing needs a network trained for the model (``memit train-mend``)."""

    algorithm = "MEND"

    layers: list[int]
    # Hidden width of each layer's low-rank residual MLP over [key; output gradient].
    rank: int = 256
    # Starting step size of the edit (learned per layer in training).
    edit_lr: float = 1e-4
    # Training: Adam learning rate of the network and of the per-layer step sizes.
    meta_lr: float = 1e-4
    lr_lr: float = 1e-3
    train_steps: int = 2000
    train_batch_size: int = 8
    # Weight of the edit loss (target NLL after the edit, on the rewrite and a rephrase)
    # against the locality loss (KL on an unrelated prompt), as c_edit in the paper.
    edit_loss_weight: float = 0.1
    # Folder of the trained network; default $MEMIT_HOME/mend/<model fingerprint>.
    network: str | None = None
    # The paper's module names; taken from the model's architecture when absent.
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None

    def validate(self) -> None:
        """Raises ``HyperParamsError`` naming the hyperparameter whose value is out of range."""
        self.check_layers()
        self.check_positive("rank", "edit_lr", "meta_lr", "lr_lr", "train_steps", "train_batch_size", "edit_loss_weight")
