"""The FFN sites conversion works on, and the original activation functions it converts from."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from hf_helu.activation import HeLU
from hf_helu.families import ActivationSite, find_activation_sites, unwrap_model

# What defines an activation function: a transformers ACT2FN name, a module, or any callable on tensors.
ActivationSpec = str | nn.Module | Callable[[torch.Tensor], torch.Tensor]
ActivationFunction = Callable[[torch.Tensor], torch.Tensor]


def ffn_sites(model: nn.Module) -> list[ActivationSite]:
    """The FFN activation sites of ``model`` (inside any PEFT / ``torch.compile`` wrapper), in module order."""
    inner = unwrap_model(model)
    sites = find_activation_sites(inner, scope="ffn")
    if not sites:
        raise ValueError(f"no FFN activation was found in {type(inner).__name__}; see hf_helu.families")
    return sites


def _function_of(spec: ActivationSpec) -> ActivationFunction:
    if isinstance(spec, str):
        from transformers.activations import ACT2FN

        try:
            return ACT2FN[spec]
        except KeyError:
            raise ValueError(f"unknown activation name {spec!r}: expected a key of transformers' ACT2FN") from None
    if callable(spec):
        return spec
    raise TypeError(f"an activation must be a name, an nn.Module or a callable, got {type(spec).__name__}")


def reference_functions(
    reference: ActivationSpec | Mapping[str, ActivationSpec], sites: Sequence[ActivationSite]
) -> dict[str, ActivationFunction]:
    """``{site name: original activation function}``: one ``reference`` for all sites, or one per site name."""
    if isinstance(reference, Mapping):
        missing = [site.name for site in sites if site.name not in reference]
        if missing:
            raise ValueError(f"no reference activation given for FFN site(s) {missing}")
        return {site.name: _function_of(reference[site.name]) for site in sites}
    function = _function_of(reference)
    return {site.name: function for site in sites}


def original_activations(model: nn.Module, sites: Sequence[ActivationSite] | None = None) -> dict[str, nn.Module]:
    """Copies of the FFN activation modules of an unpatched model, keyed by module name.

    Take them before :func:`hf_helu.patch_model` replaces them: calibration and annealing need them.
    """
    inner = unwrap_model(model)
    sites = ffn_sites(inner) if sites is None else sites
    originals = {site.name: copy.deepcopy(inner.get_submodule(site.name)) for site in sites}
    relu_like = [name for name, module in originals.items() if isinstance(module, HeLU | nn.ReLU)]
    if relu_like:
        raise ValueError(
            f"FFN activation(s) {relu_like[:3]}{'...' if len(relu_like) > 3 else ''} are already ReLU/HeLU: "
            "take the original activations before patching the model"
        )
    return originals


class _Function(nn.Module):
    """An activation function as a module (to stand in for an activation module)."""

    def __init__(self, function: ActivationFunction):
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


@contextlib.contextmanager
def reference_modules(model: nn.Module, functions: Mapping[str, ActivationFunction]) -> Iterator[None]:
    """Inside the block, the activation modules named in ``functions`` compute those functions instead."""
    saved = {}
    try:
        for name, function in functions.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            saved[name] = (parent, child, getattr(parent, child))
            setattr(parent, child, function if isinstance(function, nn.Module) else _Function(function))
        yield
    finally:
        for parent, child, module in saved.values():
            setattr(parent, child, module)
