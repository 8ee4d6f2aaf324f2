from memit.editing.rome.hparams import ROMEHyperParams

__all__ = ["ROMEHyperParams"]
