"""Hyperparameters as dataclasses loaded from JSON presets, with unknown keys rejected, and
the groups several methods share (target-vector optimisation, key statistics)."""
from __future__ import annotations

import dataclasses
import functools
import logging
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Mapping, TypeVar

from memit.errors import InputError
from memit.stats.second_moment import STATS_DTYPES
from memit.utils.io import read_json, write_json

log = logging.getLogger(__name__)

H = TypeVar("H", bound="HyperParams")

# Fields of the paper's hyperparameter files that memit does not read, and why; a file that
# has them still loads (the paper's presets ship verbatim), with one warning naming them.
PAPER_FIELDS_NOT_READ = {
    "v_loss_layer": "the loss is always read at the model's output",
    "layer_selection": "every layer in 'layers' is edited",
    "mom2_adjustment": "MEMIT and AlphaEdit always use the key second moment",
    "mlp_module_tmp": "modules are found from the model's architecture",
    "attn_module_tmp": "modules are found from the model's architecture",
    "ln_f_module": "modules are found from the model's architecture",
    "lm_head_module": "modules are found from the model's architecture",
}


PROVENANCE_KEY = "provenance"
Z_EARLY_STOPS = ("loss", "most_probable")
Z_PROMPT_FORMS = ("raw", "chat", "chat_context", "question")


class HyperParamsError(InputError):
    pass


@dataclasses.dataclass
class HyperParams:
    """Base for every method's hyperparameters. Subclasses set ``algorithm``."""

    algorithm: ClassVar[str] = ""

    @classmethod
    def from_dict(cls: type[H], data: Mapping[str, Any], source: str = "hyperparameters") -> H:
        if not isinstance(data, Mapping):
            raise HyperParamsError(f"{source}: expected a JSON object of hyperparameters, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        # How a tuned preset was found (memit tune): a record for people, not a hyperparameter.
        data = {k: v for k, v in data.items() if k != PROVENANCE_KEY}
        not_read = tuple(sorted(k for k in data if k in PAPER_FIELDS_NOT_READ and k not in fields))
        if not_read:
            _report_not_read(cls.algorithm, source, not_read)
            data = {k: v for k, v in data.items() if k not in not_read}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise HyperParamsError(f"{source}: unknown {cls.algorithm} hyperparameter(s) {unknown}")
        missing = [n for n, f in fields.items() if n not in data and _required(f)]
        if missing:
            raise HyperParamsError(f"{source}: missing {cls.algorithm} hyperparameter(s) {missing}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            _check_type(name, value, hints[name], source)
        hparams = cls(**data)
        hparams.validate()
        return hparams

    @classmethod
    def from_json(cls: type[H], path: str | Path) -> H:
        return cls.from_dict(read_json(path, what="hyperparameters file"), source=str(path))

    @classmethod
    def preset(cls: type[H], name: str) -> H:
        """A packaged preset, for example ``HyperParams.preset("SmolLM2-135M-Instruct")``."""
        path = preset_dir(cls.algorithm) / f"{name}.json"
        if not path.is_file():
            raise HyperParamsError(
                f"hparams: no {cls.algorithm} preset {name!r}; available: {list_presets(cls.algorithm)}"
            )
        return cls.from_dict(read_json(path), source=f"preset {cls.algorithm}/{name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def validate(self) -> None:
        """Check values beyond their types; subclasses extend this."""

    def check_layers(self) -> None:
        """``layers``: at least one, increasing and distinct."""
        layers = getattr(self, "layers")
        if not layers:
            raise HyperParamsError("hyperparameter 'layers' must name at least one layer")
        if layers != sorted(set(layers)):
            raise HyperParamsError(f"hyperparameter 'layers' must be increasing and distinct, got {layers}")

    def check_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise HyperParamsError(f"hyperparameter '{name}' must be positive")


@dataclasses.dataclass
class ZOptimizationParams(HyperParams):
    """The target-vector optimisation shared by MEMIT, ROME and AlphaEdit (names as in the paper's code)."""

    layers: list[int]
    v_num_grad_steps: int
    v_lr: float
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    fact_token: str = "subject_last"
    # When a request's optimisation stops before v_num_grad_steps: "loss" once its loss is
    # below 0.05 (the paper), "most_probable" once the new target is the most probable token
    # at every target position of every rewrite prompt (ENCORE, arXiv 2502.01636: overfits
    # less, and fewer steps).
    z_early_stop: str = "loss"
    # With "most_probable": how far, in nats, the new target's log-probability must lead every
    # other token's at each of those positions before the optimisation stops (0: ENCORE's stop;
    # log 2, the target at least twice as probable as any other token).
    z_stop_margin: float = 0.0
    # Generated context prefixes: for each [length, count], count prefixes of length tokens.
    context_template_length_params: list[list[int]] = dataclasses.field(default_factory=lambda: [[10, 5]])
    # The forms each target vector is optimised in, with a weight each: "raw", the rewrite
    # prompt after each context prefix (the paper); "chat", the rewrite prompt as the user turn
    # of the tokenizer's chat template with the target opening the assistant's answer, so that
    # the edit holds when the model is asked in conversation; "chat_context", the same user turn
    # with the rewrite prompt after each context prefix (as a paraphrase follows a sentence of
    # other text); "question", each of the request's ``questions`` as the user turn (requests
    # without questions leave it out). A tokenizer without a chat template gets the raw form only.
    z_prompt_forms: dict[str, float] = dataclasses.field(default_factory=lambda: {"raw": 1.0})
    # Read each request's key in those forms too (all but "question"), with the same weights,
    # instead of after the context prefixes alone: the chat turn reads the subject at a key of
    # its own (cosine 0.73-0.79 to the bare raw prompt's at the default model's edit layers),
    # and the edit is then written there as well.
    keys_in_prompt_forms: bool = False
    # The paper's module names; taken from the model's architecture when absent.
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None

    def validate(self) -> None:
        """Raises ``HyperParamsError`` naming the hyperparameter whose value is out of range."""
        super().validate()
        self.check_layers()
        if self.fact_token != "subject_last":
            raise HyperParamsError(f"hyperparameter 'fact_token': only 'subject_last' is supported, got {self.fact_token!r}")
        if self.z_early_stop not in Z_EARLY_STOPS:
            raise HyperParamsError(f"hyperparameter 'z_early_stop' must be one of {list(Z_EARLY_STOPS)}, got {self.z_early_stop!r}")
        if self.z_stop_margin < 0:
            raise HyperParamsError(f"hyperparameter 'z_stop_margin' must be non-negative, got {self.z_stop_margin}")
        if self.z_stop_margin > 0 and self.z_early_stop != "most_probable":
            raise HyperParamsError("hyperparameter 'z_stop_margin' applies to z_early_stop 'most_probable' only")
        self.check_positive("v_num_grad_steps", "v_lr", "clamp_norm_factor")
        unknown = sorted(set(self.z_prompt_forms) - set(Z_PROMPT_FORMS))
        if unknown:
            raise HyperParamsError(f"hyperparameter 'z_prompt_forms': unknown form(s) {unknown}; the forms are {list(Z_PROMPT_FORMS)}")
        if any(w < 0 for w in self.z_prompt_forms.values()) or not any(w > 0 for w in self.z_prompt_forms.values()):
            raise HyperParamsError(f"hyperparameter 'z_prompt_forms': weights must be non-negative and one positive, got {self.z_prompt_forms}")


@dataclasses.dataclass
class SequentialParams(HyperParams):
    """How the target vectors of an edit made on top of earlier ones are formed; both off by
    default, which is the paper's method."""

    # Target vectors computed on the weights from before any earlier edit (NSE, arXiv
    # 2410.04045), so later targets are not fitted to an already-edited model; the target
    # cache then serves every batch of a sequence.
    targets_from_unedited: bool = False
    # Each target vector rescaled to the norm of the unedited model's output at its subject
    # (norm anchoring, arXiv 2602.02543): breaks the feedback between growing targets and
    # growing weights over a long sequence.
    norm_anchor: bool = False


@dataclasses.dataclass
class CovarianceParams(HyperParams):
    """Where the key second moment comes from."""

    # A corpus name (see memit.stats.corpus) or file; the editing options' corpus overrides it.
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"
    # Tokens kept per corpus sample; None keeps the model's context length as the paper does.
    mom2_max_tokens: int | None = None

    def validate(self) -> None:
        """Raises ``HyperParamsError`` naming the hyperparameter whose value is out of range."""
        super().validate()
        self.check_positive("mom2_n_samples")
        if self.mom2_dtype not in STATS_DTYPES:
            raise HyperParamsError(f"hyperparameter 'mom2_dtype': unknown dtype {self.mom2_dtype!r}; choose one of {sorted(STATS_DTYPES)}")
        if self.mom2_max_tokens is not None:
            self.check_positive("mom2_max_tokens")


def preset_dir(algorithm: str) -> Path:
    return Path(str(resources.files("memit") / "presets" / algorithm))


def list_presets(algorithm: str) -> list[str]:
    return sorted(p.stem for p in preset_dir(algorithm).glob("*.json"))


def preset_name_for(model_name: str) -> str:
    """The preset file stem for a model name as the paper spells it (``EleutherAI/gpt-j-6B``
    becomes ``EleutherAI_gpt-j-6B``), or a local folder's or GGUF file's name without the
    suffix; ``default`` maps to the default model."""
    from memit.models.loading import DEFAULT_MODEL, DEFAULT_MODEL_NAME

    if model_name == DEFAULT_MODEL:
        return DEFAULT_MODEL_NAME
    path = Path(model_name.rstrip("/"))
    if not path.exists():
        return model_name.replace("/", "_")
    return path.stem if path.suffix == ".gguf" else path.name


@functools.cache
def _report_not_read(algorithm: str, source: str, names: tuple[str, ...]) -> None:
    reasons = "; ".join(f"{n} ({PAPER_FIELDS_NOT_READ[n]})" for n in names)
    log.warning("%s: %s hyperparameter(s) of the paper's format that memit does not read: %s", source, algorithm, reasons)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _check_type(name: str, value: Any, hint: Any, source: str) -> None:
    if not _matches(value, hint):
        raise HyperParamsError(f"{source}: hyperparameter '{name}' must be {_describe(hint)}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
