"""The catalogue of editing methods. It imports every method (each imports only what lies
below it); adding a method is one folder and one row of METHODS."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from transformers import PreTrainedModel

from memit.editing.alphaedit.main import AlphaEditEditor
from memit.editing.base import Editor
from memit.editing.ft.main import FTEditor, FTLEditor
from memit.editing.hparams import HyperParams, HyperParamsError, preset_name_for
from memit.editing.memit.main import MEMITEditor
from memit.editing.mend.main import MENDEditor
from memit.editing.rome.main import ROMEEditor

METHODS: dict[str, type[Editor]] = {
    cls.name: cls for cls in (MEMITEditor, AlphaEditEditor, ROMEEditor, FTEditor, FTLEditor, MENDEditor)
}


def get_editor_class(name: str) -> type[Editor]:
    """The ``Editor`` subclass of method ``name`` (``"MEMIT"``, ``"ROME"``, ``"FT"``, ``"FT-L"``,
    ``"AlphaEdit"``, ``"MEND"``); raises ``HyperParamsError`` for an unknown name."""
    if name not in METHODS:
        raise HyperParamsError(f"alg: unknown editing method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def resolve_hparams(algorithm: str, hparams: HyperParams | str | Path | Mapping | None, model: PreTrainedModel) -> HyperParams:
    """A hyperparameter object from an object, a dict, a JSON file, a preset name, or the
    preset matching the model's name when None."""
    cls = get_editor_class(algorithm).hparams_class
    if isinstance(hparams, HyperParams):
        return hparams
    if isinstance(hparams, Mapping):
        return cls.from_dict(hparams)
    if hparams is not None and Path(hparams).is_file():
        return cls.from_json(hparams)
    name = str(hparams) if hparams is not None else preset_name_for(getattr(model.config, "_name_or_path", ""))
    return cls.preset(name)
