from memit.editing.alphaedit.hparams import AlphaEditHyperParams

__all__ = ["AlphaEditHyperParams"]
