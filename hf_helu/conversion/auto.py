"""``conversion="auto"``: which conversion method a run gets when it does not name one, and why.

The naive swap of a pretrained GELU checkpoint's FFN activation for ReLU/HeLU loses most of the checkpoint's
fine-tuning quality (RESULTS.md 2.3-2.4: STS-B 85 -> 23, the 4-task GLUE mean 62.7 -> 40.9), while
calibrate+anneal keeps it (62.2 vs GELU's 63.1). So ``auto`` converts exactly when there is something to keep:

* a pretrained checkpoint whose FFN activation is not already ReLU-like, patched to relu/helu, for training:
  per family, from what was measured on that family. Encoders and other models: :data:`RECOMMENDED_METHOD`.
  Causal LMs with gated FFNs (LLaMA-style SwiGLU): :data:`GATED_DECODER_METHOD` with calibration target
  :data:`GATED_DECODER_TARGET` (RESULTS.md, "Decoder LMs: SmolLM2-135M conversion": WikiText-2 perplexity
  38.0 vs 61.3 for target ``"layer"`` on 32,768 calibration tokens, original 26.9, naive swap 13,975);
* otherwise ``"none"``: random weights (``init="scratch"``), the activation kept (``"keep"``), a checkpoint that
  already has ReLU/HeLU in its FFN blocks (the swap does not change its forward), or evaluation only.

:func:`resolve_conversion` is the one place that decides; the GLUE and speech recipes and :func:`convert_model` call it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hf_helu.activation import HeLU
from hf_helu.conversion.quality import is_causal_lm
from hf_helu.conversion.sites import ffn_sites
from hf_helu.errors import UsageError
from hf_helu.families import unwrap_model

CONVERSION_METHODS = ("none", "calibrate", "anneal", "calibrate+anneal")  # what a run can do
AUTO = "auto"
CONVERSION_CHOICES = (AUTO, *CONVERSION_METHODS)  # what a user can ask for
RECOMMENDED_METHOD = "calibrate+anneal"
GATED_DECODER_METHOD = "calibrate"
GATED_DECODER_TARGET = "model"
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
    target: str = "layer"  # calibration target (see calibrate_ffn)

    def to_dict(self) -> dict[str, str]:
        summary = {"method": self.method, "requested": self.requested, "reason": self.reason}
        if self.target != "layer":  # the default calibration target is left out (results.json stays as it was)
            summary["target"] = self.target
        return summary


def ffn_activation_names(model: nn.Module) -> list[str]:
    """The distinct class names of ``model``'s FFN activation modules, in first-seen order (``["GELUActivation"]``)."""
    inner = unwrap_model(model)
    names = [type(inner.get_submodule(site.name)).__name__ for site in ffn_sites(inner)]
    return list(dict.fromkeys(names))


def gated_decoder(model: nn.Module) -> bool:
    """True for a causal LM whose FFNs are gated (SwiGLU/GeGLU): the family ``auto`` converts by calibration."""
    inner = unwrap_model(model)
    return is_causal_lm(inner) and any(site.gated for site in ffn_sites(inner))


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
            raise UsageError(
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
    if gated_decoder(model):
        return ConversionChoice(
            GATED_DECODER_METHOD,
            AUTO,
            f"causal LM with gated FFNs ({names} -> {activation}): {GATED_DECODER_METHOD} with target "
            f"{GATED_DECODER_TARGET!r} is the best training-free conversion measured on this family (RESULTS.md, "
            "Decoder LMs)",
            GATED_DECODER_TARGET,
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
    "GATED_DECODER_METHOD",
    "GATED_DECODER_TARGET",
    "RECOMMENDED_METHOD",
    "ConversionChoice",
    "check_conversion_method",
    "ffn_activation_names",
    "gated_decoder",
    "relu_like_ffn",
    "resolve_conversion",
]
