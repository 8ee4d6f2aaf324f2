from memit.models.layout import ModelLayout, UnsupportedArchitectureError
from memit.models.loading import DEFAULT_MODEL, load_model, model_fingerprint

__all__ = ["DEFAULT_MODEL", "ModelLayout", "UnsupportedArchitectureError", "load_model", "model_fingerprint"]
