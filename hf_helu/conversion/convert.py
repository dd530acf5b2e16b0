"""One call: patch the FFN blocks, then calibrate and/or set up annealing (:func:`convert_model`).

result = convert_model(model, "auto", calibration_batches=batches)   # patch + the recommended method
# ... fine-tune, calling result.annealer.step() once per optimizer step (or use result.annealer.callback()) ...
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from hf_helu.activation import DEFAULT_ALPHA, HeLU
from hf_helu.conversion.anneal import DEFAULT_ANNEAL_FRACTION, ActivationAnnealer
from hf_helu.conversion.auto import ConversionChoice, check_conversion_method, resolve_conversion
from hf_helu.conversion.calibrate import DEFAULT_RIDGE, CalibrationReport, calibrate_ffn
from hf_helu.conversion.sites import ActivationSpec, ffn_sites, original_activations
from hf_helu.families import Scope, unwrap_model
from hf_helu.patching import PatchReport, patch_model, unpatch_model

PATCH_TARGETS = ("helu", "relu")


@dataclass
class ConversionResult:
    """What a conversion did: the method, why it was chosen, the patch (if done here), the calibration, the annealer
    to drive (None unless the method anneals)."""

    method: str
    patch_report: PatchReport | None = None
    calibration: CalibrationReport | None = None
    annealer: ActivationAnnealer | None = None
    choice: ConversionChoice | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for results.json)."""
        summary: dict[str, Any] = {"method": self.method}
        if self.choice is not None:
            summary.update(requested=self.choice.requested, reason=self.choice.reason)
        if self.calibration is not None:
            summary["calibration"] = self.calibration.to_dict()
        if self.annealer is not None:
            summary["anneal"] = {"anneal_fraction": self.annealer.anneal_fraction, "mode": self.annealer.mode}
        return summary


def patch_activation(model: nn.Module, to: str, alpha: float = DEFAULT_ALPHA, scope: Scope = "ffn") -> PatchReport:
    """Put HeLU(``alpha``) (``to="helu"``) or ReLU (``to="relu"``) into the FFN blocks of ``model`` (``scope``).

    ``relu`` is HeLU patched in, then swapped for ReLU (:func:`hf_helu.patching.unpatch_model`), so both touch
    exactly the same modules and config attribute; the report is that of the last step.
    """
    if to not in PATCH_TARGETS:
        raise ValueError(f"activation must be 'helu' or 'relu', got {to!r}")
    report = patch_model(model, alpha=alpha, scope=scope)
    if to == "relu":
        report = unpatch_model(model, to="relu")
    return report


def apply_conversion(
    model: nn.Module,
    method: str,
    original: Mapping[str, ActivationSpec],
    *,
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ridge: float = DEFAULT_RIDGE,
    total_steps: int | None = None,
    anneal_fraction: float = DEFAULT_ANNEAL_FRACTION,
) -> ConversionResult:
    """Apply ``method`` to a model already patched with HeLU/ReLU; ``original`` from :func:`original_activations`.

    Only the FFN sites named in ``original`` that now hold HeLU/ReLU are converted (a layer-restricted
    patch leaves the others alone).
    """
    check_conversion_method(method)
    result = ConversionResult(method)
    if method == "none":
        return result
    calibrate, anneal = "calibrate" in method, "anneal" in method
    if calibrate and calibration_batches is None:
        raise ValueError(f"conversion {method!r} needs calibration_batches (unlabeled model inputs)")
    inner = unwrap_model(model)
    sites = [
        site
        for site in ffn_sites(inner)
        if site.name in original and isinstance(inner.get_submodule(site.name), HeLU | nn.ReLU)
    ]
    if not sites:
        raise ValueError("no FFN activation of the model is both patched (HeLU/ReLU) and named in `original`")
    if calibrate:
        result.calibration = calibrate_ffn(inner, calibration_batches, original, ridge=ridge, sites=sites)
    if anneal:
        # A calibrated model's projections expect ReLU inputs: anneal only the gradient then.
        mode = "gradient" if calibrate else "blend"
        result.annealer = ActivationAnnealer(inner, original, total_steps, anneal_fraction, sites=sites, mode=mode)
    return result


def convert_model(
    model: nn.Module,
    method: str = "auto",
    *,
    activation: str = "helu",
    alpha: float = DEFAULT_ALPHA,
    scope: Scope = "ffn",
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ridge: float = DEFAULT_RIDGE,
    total_steps: int | None = None,
    anneal_fraction: float = DEFAULT_ANNEAL_FRACTION,
) -> ConversionResult:
    """Patch a pretrained ``model``'s FFN blocks with HeLU (``activation="helu"``, ``alpha``) or ReLU, then apply
    ``method`` to keep the checkpoint's quality.

    ``method``: ``"auto"`` (default: :func:`hf_helu.conversion.resolve_conversion` picks ``"calibrate+anneal"``,
    or ``"none"`` when the FFN activation is already ReLU/HeLU), ``"none"`` (plain swap), ``"calibrate"`` (refit
    the output projections on ``calibration_batches``, unlabeled model inputs), ``"anneal"`` (the result's
    ``annealer`` must be stepped once per optimizer step over ``total_steps``, or driven by
    ``result.annealer.callback()`` in the HF Trainer, which supplies the total), or ``"calibrate+anneal"``
    (calibrate, then anneal the gradient only: the forward stays the calibrated ReLU model).
    ``result.choice`` says which method ran and why.
    """
    if activation not in PATCH_TARGETS:
        raise ValueError(f"activation must be 'helu' or 'relu', got {activation!r}")
    choice = resolve_conversion(method, activation=activation, model=model)
    method = choice.method
    originals = original_activations(model) if method != "none" else {}
    patch_report = patch_activation(model, activation, alpha=alpha, scope=scope)
    result = apply_conversion(
        model,
        method,
        originals,
        calibration_batches=calibration_batches,
        ridge=ridge,
        total_steps=total_steps,
        anneal_fraction=anneal_fraction,
    )
    result.patch_report, result.choice = patch_report, choice
    return result
