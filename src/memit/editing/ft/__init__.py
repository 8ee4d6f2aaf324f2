from memit.editing.ft.hparams import FTHyperParams, FTLHyperParams

__all__ = ["FTHyperParams", "FTLHyperParams"]
