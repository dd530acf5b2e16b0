"""``conversion="auto"``: which conversion method a run gets when it does not name one, and why.

The naive swap of a pretrained GELU checkpoint's FFN activation for ReLU/HeLU loses most of the checkpoint's
fine-tuning quality (RESULTS.md 2.3-2.4: STS-B 85 -> 23, the 4-task GLUE mean 62.7 -> 40.9), while
calibrate+anneal keeps it (62.2 vs GELU's 63.1). So ``auto`` converts exactly when there is something to keep:

* a pretrained checkpoint whose FFN activation is not already ReLU-like, patched to relu/helu, for training:
  :data:`RECOMMENDED_METHOD`;
* otherwise ``"none"``: random weights (``init="scratch"``), the activation kept (``"keep"``), a checkpoint that
  already has ReLU/HeLU in its FFN blocks (the swap does not change its forward), or evaluation only.

:func:`resolve_conversion` is the one place that decides; the GLUE and speech recipes and :func:`convert_model` call it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hf_helu.activation import HeLU
from hf_helu.conversion.sites import ffn_sites
from hf_helu.families import unwrap_model

CONVERSION_METHODS = ("none", "calibrate", "anneal", "calibrate+anneal")  # what a run can do
AUTO = "auto"
CONVERSION_CHOICES = (AUTO, *CONVERSION_METHODS)  # what a user can ask for
RECOMMENDED_METHOD = "calibrate+anneal"
CONVERTING_TARGETS = ("relu", "helu")


def check_conversion_method(method: object, allow_auto: bool = False) -> str:
    """``method`` if it is one of :data:`CONVERSION_METHODS` (or ``"auto"``, with ``allow_auto``), else a ValueError."""
    choices = CONVERSION_CHOICES if allow_auto else CONVERSION_METHODS
    if method not in choices:
        raise ValueError(f"unknown conversion method {method!r}: expected one of {', '.join(choices)}")
    return method


@dataclass(frozen=True)
class ConversionChoice:
    """The method a run uses (``method``, never ``"auto"``), what was asked (``requested``) and why (``reason``)."""

    method: str
    requested: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"method": self.method, "requested": self.requested, "reason": self.reason}


def ffn_activation_names(model: nn.Module) -> list[str]:
    """The distinct class names of ``model``'s FFN activation modules, in first-seen order (``["GELUActivation"]``)."""
    inner = unwrap_model(model)
    names = [type(inner.get_submodule(site.name)).__name__ for site in ffn_sites(inner)]
    return list(dict.fromkeys(names))


def relu_like_ffn(model: nn.Module) -> bool:
    """True when every FFN activation of ``model`` is already ReLU or HeLU (forward ``max(0, z)``, exactly)."""
    inner = unwrap_model(model)
    return all(isinstance(inner.get_submodule(site.name), HeLU | nn.ReLU) for site in ffn_sites(inner))


def resolve_conversion(
    requested: str,
    *,
    activation: str,
    model: nn.Module | None = None,
    init: str = "pretrained",
    training: bool = True,
) -> ConversionChoice:
    """The conversion method for a run: ``requested`` itself, or for ``"auto"`` the method the rules above give.

    ``activation``: the FFN activation the run patches in (``"keep"``, ``"relu"``, ``"helu"``); ``model``: the
    loaded, **not yet patched** model (needed for ``auto`` with a pretrained checkpoint and relu/helu, and to
    refuse an explicit method on a checkpoint that is already ReLU); ``init``: ``"pretrained"`` or ``"scratch"``;
    ``training``: False for an evaluation-only run. An explicit method is returned as asked, except that
    converting a ReLU/HeLU checkpoint is refused (there is no other activation to convert from).
    """
    check_conversion_method(requested, allow_auto=True)
    if activation not in ("keep", *CONVERTING_TARGETS):
        raise ValueError(f"activation must be 'keep', 'relu' or 'helu', got {activation!r}")
    if requested != AUTO:
        if requested != "none" and model is not None and relu_like_ffn(model):
            raise ValueError(
                f"conversion {requested!r}: the checkpoint's FFN activations are already ReLU-like "
                f"({', '.join(ffn_activation_names(model))}), there is nothing to convert from; "
                "use conversion 'none' or 'auto'"
            )
        return ConversionChoice(requested, requested, "requested explicitly")
    if activation not in CONVERTING_TARGETS:
        return ConversionChoice("none", AUTO, f"activation {activation!r}: the checkpoint's activation is kept")
    if init == "scratch":
        return ConversionChoice("none", AUTO, "init 'scratch': random weights, no pretrained quality to keep")
    if not training:
        return ConversionChoice("none", AUTO, "evaluation only: conversion applies to training")
    if model is None:
        raise ValueError("conversion 'auto' of a pretrained checkpoint needs the loaded (unpatched) model")
    names = ", ".join(ffn_activation_names(model))
    if relu_like_ffn(model):
        return ConversionChoice(
            "none", AUTO, f"the checkpoint's FFN activation is already ReLU-like ({names}): the swap is exact"
        )
    return ConversionChoice(
        RECOMMENDED_METHOD,
        AUTO,
        f"pretrained checkpoint, FFN activation {names} -> {activation}: {RECOMMENDED_METHOD} keeps its quality "
        "(RESULTS.md 2.3-2.4; the naive swap loses most of it)",
    )


__all__ = [
    "AUTO",
    "CONVERSION_CHOICES",
    "CONVERSION_METHODS",
    "CONVERTING_TARGETS",
    "RECOMMENDED_METHOD",
    "ConversionChoice",
    "check_conversion_method",
    "ffn_activation_names",
    "relu_like_ffn",
    "resolve_conversion",
]
