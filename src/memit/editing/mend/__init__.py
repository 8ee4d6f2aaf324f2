from memit.editing.mend.hparams import MENDHyperParams

__all__ = ["MENDHyperParams"]
