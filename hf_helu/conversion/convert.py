"""One call: patch the FFN blocks, then calibrate and/or set up annealing (:func:`convert_model`).

result = convert_model(model, "auto", calibration_batches=batches)   # patch + the recommended method
# ... fine-tune, calling result.annealer.step() once per optimizer step (or use result.annealer.callback()) ...
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_helu.activation import DEFAULT_ALPHA, HeLU
from hf_helu.conversion.anneal import DEFAULT_ANNEAL_FRACTION, ActivationAnnealer
from hf_helu.conversion.auto import ConversionChoice, check_conversion_method, resolve_conversion
from hf_helu.conversion.calibrate import DEFAULT_RIDGE, CalibrationReport, calibrate_ffn
from hf_helu.conversion.quality import ConversionQuality, measure_quality
from hf_helu.conversion.sites import ActivationSpec, ffn_sites, original_activations, reference_functions
from hf_helu.conversion.thin_data import (
    check_calibration_tokens,
    minimum_calibration_tokens,  # noqa: F401  (named in the docstrings)
)
from hf_helu.families import ActivationSite, Scope, unwrap_model
from hf_helu.patching import PatchReport, UnconvertedSwapWarning, patch_model, unpatch_model
from hf_helu.rollback import restore_on_error
from hf_helu.sources import drop_gguf_quantization

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
    quality: ConversionQuality | None = None  # measured on held-out calibration batches (calibrating methods)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for results.json)."""
        summary: dict[str, Any] = {"method": self.method}
        if self.choice is not None:
            summary.update(requested=self.choice.requested, reason=self.choice.reason)
        if self.calibration is not None:
            summary["calibration"] = self.calibration.to_dict()
        if self.quality is not None:
            summary["quality"] = self.quality.to_dict()
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
    drop_gguf_quantization(model)
    with warnings.catch_warnings():  # the caller chose the conversion (possibly "none"): no advice to convert
        warnings.simplefilter("ignore", UnconvertedSwapWarning)
        report = patch_model(model, alpha=alpha, scope=scope)
    if to == "relu":
        report = unpatch_model(model, to="relu")
    return report


def _rows(batch: Mapping[str, Any]) -> int:
    """The number of examples in a batch: the first dimension its tensors share (0 when it has none)."""
    sizes = {value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor) and value.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else 0


def _split_rows(batch: Mapping[str, Any], keep: int) -> tuple[dict, dict]:
    """``batch`` as (its first ``keep`` rows, the others)."""
    head = {k: v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    tail = {k: v[keep:] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}
    return head, tail


def split_holdout(batches: Sequence[Mapping[str, Any]], holdout: int | None) -> tuple[list, list]:
    """(fit batches, held-out batches): the last ``holdout`` batches held out; None: an eighth, at least one, when
    there are two batches or more, and the last eighth of the rows (at least one) of a single batch of two rows or
    more, so that what a conversion kept is always measured."""
    batches = list(batches)
    if holdout is None and len(batches) == 1 and _rows(batches[0]) >= 2:
        rows = _rows(batches[0])
        head, tail = _split_rows(batches[0], rows - max(1, rows // 8))
        return [head], [tail]
    if holdout is None:
        holdout = max(1, len(batches) // 8) if len(batches) >= 2 else 0
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < len(batches):
        raise ValueError(f"holdout must be an integer from 0 to {len(batches) - 1} (batches - 1), got {holdout!r}")
    return batches[: len(batches) - holdout], batches[len(batches) - holdout :]


def _projection_weights(model: nn.Module, sites: Sequence[ActivationSite], copy: bool = True) -> dict[str, Any]:
    """Copies (``copy``) of the output projections' parameters (what calibration changes), by parameter name."""
    names = {site.output_projection for site in sites}
    return {
        name: param.detach().clone() if copy else param
        for name, param in model.named_parameters()
        if name.rpartition(".")[0] in names
    }


def _check_quality(quality: ConversionQuality, method: str) -> None:
    if quality.kept is None:
        warnings.warn(f"conversion {method!r}: what it kept could not be measured: {quality}", stacklevel=3)
    elif not quality.kept:
        warnings.warn(
            f"conversion {method!r} did not keep the model's quality {quality}. Calibrate on more tokens, or "
            "fine-tune after conversion (e.g. with annealing).",
            stacklevel=3,
        )


def apply_conversion(
    model: nn.Module,
    method: str,
    original: Mapping[str, ActivationSpec],
    *,
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ridge: float = DEFAULT_RIDGE,
    total_steps: int | None = None,
    anneal_fraction: float = DEFAULT_ANNEAL_FRACTION,
    target: str = "layer",
    holdout: int | None = None,
    progress: bool = False,
    weights_before: Mapping[str, torch.Tensor] | None = None,
) -> ConversionResult:
    """Apply ``method`` to a model already patched with HeLU/ReLU; ``original`` from :func:`original_activations`.

    Only the FFN sites named in ``original`` that now hold HeLU/ReLU are converted (a layer-restricted
    patch leaves the others alone). Calibration fits on all but ``holdout`` of the batches (see
    :func:`split_holdout`) and measures what it kept on those (``result.quality``); it warns when that is not
    enough (:data:`hf_helu.conversion.quality.KEPT_PERPLEXITY_RATIO`, ``KEPT_FFN_ERROR``), when it cannot be
    measured, and when the fit had fewer tokens than :func:`minimum_calibration_tokens` asks for.
    ``progress``: a progress bar per calibrated layer (tqdm, on stderr). ``weights_before``: copies of the
    output projections' parameters the caller already holds (by parameter name), used instead of new copies.
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
        fit, held_out = split_holdout(calibration_batches, holdout)
        if not held_out:
            before = {}
        elif weights_before is not None:  # the caller's copies of the projections' parameters (no second copy)
            before = {name: weights_before[name] for name in _projection_weights(inner, sites, copy=False)}
        else:
            before = _projection_weights(inner, sites)
        result.calibration = calibrate_ffn(
            inner, fit, original, ridge=ridge, sites=sites, target=target, progress=progress
        )
        check_calibration_tokens(result.calibration, inner)
        if held_out:
            functions = reference_functions(original, sites)
            result.quality = measure_quality(inner, functions, before, held_out, sites)
            _check_quality(result.quality, method)
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
    target: str | None = None,
    holdout: int | None = None,
    progress: bool = False,
) -> ConversionResult:
    """Patch a pretrained ``model``'s FFN blocks with HeLU (``activation="helu"``, ``alpha``) or ReLU, then apply
    ``method`` to keep the checkpoint's quality.

    ``method``: ``"auto"`` (default: :func:`hf_helu.conversion.resolve_conversion` picks ``"calibrate+anneal"``,
    or ``"none"`` when the FFN activation is already ReLU/HeLU), ``"none"`` (plain swap), ``"calibrate"`` (refit
    the output projections on ``calibration_batches``, unlabeled model inputs), ``"anneal"`` (the result's
    ``annealer`` must be stepped once per optimizer step over ``total_steps``, or driven by
    ``result.annealer.callback()`` in the HF Trainer, which supplies the total), or ``"calibrate+anneal"``
    (calibrate, then anneal the gradient only: the forward stays the calibrated ReLU model).
    ``result.choice`` says which method ran and why; ``target`` (``"layer"`` or ``"model"``, see
    :func:`calibrate_ffn`) defaults to what ``auto`` measured best for the model's family. ``holdout`` calibration
    batches (default an eighth) are kept out of the fit to measure what the conversion kept: ``result.quality``,
    with a warning when it was not kept; a fit on fewer tokens than :func:`minimum_calibration_tokens` warns too.
    float16/bfloat16 models are calibrated in float32 (:func:`float32_compute`) and keep their dtype. ``progress``:
    a tqdm bar per calibrated layer. A model loaded from a GGUF file becomes an ordinary (saveable) model.
    When it raises, the model is left exactly as it was (modules, weights, config: :mod:`hf_helu.rollback`).
    """
    if activation not in PATCH_TARGETS:
        raise ValueError(f"activation must be 'helu' or 'relu', got {activation!r}")
    choice = resolve_conversion(method, activation=activation, model=model)
    method = choice.method
    target = choice.target if target is None else target
    calibrating = "calibrate" in method
    if calibrating and calibration_batches is None:
        raise ValueError(f"conversion {method!r} needs calibration_batches (unlabeled model inputs)")
    originals = original_activations(model) if method != "none" else {}
    # What calibration writes in place, copied for the rollback (and reused as the weights before calibration, when
    # held out batches measure it). A half-precision model computes on float32 copies: its tensors stay untouched.
    in_place = _projection_parameter_names(model) if calibrating else set()
    params = dict(model.named_parameters())
    in_place = {name for name in in_place if params[name].dtype not in (torch.float16, torch.bfloat16)}
    with restore_on_error(model, in_place=in_place) as snapshot:
        patch_report = patch_activation(model, activation, alpha=alpha, scope=scope)
        with float32_compute(model, calibrating):
            result = apply_conversion(
                model,
                method,
                originals,
                calibration_batches=calibration_batches,
                ridge=ridge,
                total_steps=total_steps,
                anneal_fraction=anneal_fraction,
                target=target,
                holdout=holdout,
                progress=progress,
                weights_before=snapshot.clones if unwrap_model(model) is model and in_place else None,
            )
    result.patch_report, result.choice = patch_report, choice
    return result


def _projection_parameter_names(model: nn.Module) -> set[str]:
    """Names of the FFN output projections' parameters (what calibration writes in place), as ``model`` names them."""
    inner = unwrap_model(model)
    prefix = next((name + "." for name, module in model.named_modules() if module is inner and name), "")
    projections = {prefix + site.output_projection for site in ffn_sites(inner) if site.output_projection}
    return {name for name, _ in model.named_parameters() if name.rpartition(".")[0] in projections}


@contextlib.contextmanager
def float32_compute(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside the block a float16/bfloat16 ``model`` computes in float32; its tensors get their dtypes back at the
    end (on success: an exception leaves the restoring to :func:`restore_on_error`).

    Calibration fits W2' on half-precision forwards otherwise: the targets carry the half format's rounding
    (bfloat16 keeps 8 significant bits: a relative error of 2^-9 per value, as large as a good fit's error), and the
    residual check of target ``"model"`` cannot tell a residual add from a norm at that precision. float32 compute
    costs twice the weights' memory for the length of the conversion; the result is rounded once, at the end.
    """
    halves = (torch.float16, torch.bfloat16)
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in halves] if enabled else []
    dtypes = [t.dtype for t in tensors]
    with torch.no_grad():
        for tensor in tensors:
            tensor.data = tensor.data.float()
    yield
    with torch.no_grad():
        for tensor, dtype in zip(tensors, dtypes, strict=True):
            tensor.data = tensor.data.to(dtype)
