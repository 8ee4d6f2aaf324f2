"""memit: mass-editing memory in transformer language models."""
from memit.api import apply_memit_to_model, edit_model
from memit.deltas import WeightDeltas
from memit.editing.base import EditOptions, Editor, get_editor_class
from memit.editing.memit.hparams import MEMITHyperParams
from memit.models import DEFAULT_MODEL, ModelLayout, load_model
from memit.requests import EditRequest, RequestError, load_requests, parse_requests

__all__ = [
    "DEFAULT_MODEL",
    "EditOptions",
    "EditRequest",
    "Editor",
    "MEMITHyperParams",
    "ModelLayout",
    "RequestError",
    "WeightDeltas",
    "apply_memit_to_model",
    "edit_model",
    "get_editor_class",
    "load_model",
    "load_requests",
    "parse_requests",
]
