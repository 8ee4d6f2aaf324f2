from memit.editing.memit.hparams import MEMITHyperParams

__all__ = ["MEMITHyperParams"]
