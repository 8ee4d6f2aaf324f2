"""memit: mass-editing memory in transformer language models."""
from memit.api import apply_memit_to_model, edit_model
from memit.chain import EditChain
from memit.deltas import WeightDeltas
from memit.editing.alphaedit.hparams import AlphaEditHyperParams
from memit.editing.base import EditOptions, Editor, EditTask
from memit.editing.ft.hparams import FTHyperParams, FTLHyperParams
from memit.editing.memit.hparams import MEMITHyperParams
from memit.editing.mend.hparams import MENDHyperParams
from memit.editing.methods import get_editor_class
from memit.editing.rome.hparams import ROMEHyperParams
from memit.models import DEFAULT_MODEL, ModelLayout, load_model
from memit.requests import EditRequest, RequestError, load_requests, parse_requests

__all__ = [
    "AlphaEditHyperParams",
    "DEFAULT_MODEL",
    "EditChain",
    "EditOptions",
    "EditRequest",
    "EditTask",
    "FTHyperParams",
    "FTLHyperParams",
    "Editor",
    "MEMITHyperParams",
    "MENDHyperParams",
    "ModelLayout",
    "ROMEHyperParams",
    "RequestError",
    "WeightDeltas",
    "apply_memit_to_model",
    "edit_model",
    "get_editor_class",
    "load_model",
    "load_requests",
    "parse_requests",
]
