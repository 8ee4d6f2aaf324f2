"""Forward hooks: read a module's input or output, rewrite a layer's output, stop early."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from memit.utils.compat import replayed_layer_output


class _StopForward(Exception):
    """Raised by a hook once everything wanted has been read, to skip the layers above."""


def first_tensor(output: Any) -> torch.Tensor:
    """A layer's hidden states, whether it returns a tensor or a tuple starting with one."""
    return output[0] if isinstance(output, tuple) else output


def with_first_tensor(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def run_and_capture(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    stop_after: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``model(**batch)`` and return the first input of each module in ``inputs_of`` and
    the hidden-state output of each in ``outputs_of``; stop after module ``stop_after``."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name in inputs_of:
                inputs[name] = args[0]
            if name in outputs_of:
                outputs[name] = first_tensor(output)
            if name == stop_after:
                raise _StopForward

        return hook

    try:
        for name in dict.fromkeys([*inputs_of, *outputs_of, *([stop_after] if stop_after else [])]):
            handles.append(model.get_submodule(name).register_forward_hook(make_hook(name)))
        try:
            model(**batch)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return inputs, outputs


@contextmanager
def rewrite_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, ``module``'s hidden-state output is replaced by ``fn(output)``."""
    handle = module.register_forward_hook(lambda mod, args, out: with_first_tensor(out, fn(first_tensor(out))))
    try:
        yield
    finally:
        handle.remove()


class _ReplayLayer(nn.Module):
    """Stands in for a decoder layer without computing it: returns ``source()``, or its input
    when ``source`` is None. Other attributes (such as ``attention_type``) come from the real layer."""

    def __init__(self, original: nn.Module, source: Callable[[], torch.Tensor] | None, tuple_output: bool):
        super().__init__()
        self.__dict__["_original"] = original
        self.__dict__["_source"] = source
        self.__dict__["_tuple_output"] = tuple_output

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = hidden_states if self._source is None else self._source()
        return replayed_layer_output(out, kwargs) if self._tuple_output else out

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_original"], name)


@contextmanager
def skip_layers_below(
    layers: nn.ModuleList, layer: int, source: Callable[[], torch.Tensor], tuple_output: bool
) -> Iterator[None]:
    """While active, layers ``0..layer`` are not computed and layer ``layer`` outputs ``source()``.

    ``source`` is called on each forward pass, so its result may depend on tensors being optimised.
    """
    originals = [layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            layers[i] = _ReplayLayer(originals[i], source if i == layer else None, tuple_output)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original
