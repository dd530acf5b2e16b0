"""Calibration at patch time: refit each FFN output projection so that ReLU inputs give the original outputs.

``W2' relu(z) + b'`` is fitted to ``W2 act(z) + b`` on the tokens of a few hundred unlabeled examples:
ridge least squares in float64, layer by layer in execution order, each layer fitted on the inputs
produced by the already calibrated layers before it. Seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_helu.capture import ForwardCapture, submodules
from hf_helu.conversion.batches import model_inputs, padding_mask
from hf_helu.conversion.sites import ActivationFunction, ActivationSpec, ffn_sites, reference_functions
from hf_helu.families import ActivationSite, unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-3


@dataclass(frozen=True)
class LayerCalibration:
    """Fit of one FFN output projection: relative output error before and after, on the fit tokens."""

    activation: str  # qualified name of the FFN's activation module (its ActivationSite.name)
    output_projection: str
    tokens: int
    error_before: float
    error_after: float


@dataclass
class CalibrationReport:
    """What :func:`calibrate_ffn` did, one row per FFN block in execution order."""

    layers: list[LayerCalibration] = field(default_factory=list)
    ridge: float = DEFAULT_RIDGE
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ridge": self.ridge,
            "batches": self.batches,
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [f"calibrated {len(self.layers)} FFN output projection(s), ridge {self.ridge:g}"]
        rows.append(f"{'output projection':<48} {'tokens':>8} {'error before':>13} {'error after':>12}")
        for layer in self.layers:
            rows.append(
                f"{layer.output_projection:<48} {layer.tokens:>8} "
                f"{layer.error_before:>13.4f} {layer.error_after:>12.4f}"
            )
        return "\n".join(rows)


class _StopForward(Exception):
    """Raised from a hook once the layer being calibrated has seen the whole batch."""


def check_ridge(ridge: object) -> float:
    """``ridge`` as a float if it is a finite number >= 0, else a ValueError naming it."""
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def _projection_weight(projection: nn.Module) -> torch.Tensor:
    """The projection's weight as (in_features, out_features), the layout the fit solves for."""
    if isinstance(projection, Conv1D):
        return projection.weight
    if isinstance(projection, nn.Linear):
        return projection.weight.T
    raise TypeError(
        f"FFN output projection must be an nn.Linear or a transformers Conv1D, got {type(projection).__name__}; "
        "calibrate before wrapping the model (e.g. before peft.get_peft_model)"
    )


def _relu_inputs(z: torch.Tensor, x_original: torch.Tensor, reference: ActivationFunction, gated: bool) -> torch.Tensor:
    """What the output projection sees once the activation is ReLU, given what it saw with the original.

    Plain FFN: ``relu(z)``. Gated FFN (``act(gate) * up``): rescale each element by relu(gate)/act(gate),
    which is 0 where gate <= 0 and finite elsewhere (act(g) > 0 for g > 0 for GELU, SiLU and kin).
    """
    if not gated:
        if z.shape != x_original.shape:
            raise ValueError(
                f"FFN activation output {tuple(z.shape)} does not feed its output projection {tuple(x_original.shape)} "
                "directly; is this a gated FFN?"
            )
        return torch.relu(z)
    if z.shape != x_original.shape:
        raise ValueError(
            f"gated FFN: activation input {tuple(z.shape)} and output projection input {tuple(x_original.shape)} differ"
        )
    activated = reference(z)
    positive = (z > 0) & (activated > 0)
    ratio = torch.where(positive, torch.relu(z) / torch.where(positive, activated, torch.ones_like(activated)), 0)
    return x_original * ratio


def _execution_order(
    model: nn.Module, sites: Sequence[ActivationSite], batch: dict[str, Any]
) -> list[tuple[ActivationSite, int]]:
    """Sites in the order their output projections run, with how many times each runs per forward."""
    by_projection = {site.output_projection: site for site in sites}
    with ForwardCapture(submodules(model, by_projection), record=None) as capture:
        model(**batch)
    silent = [site.output_projection for site in sites if site.output_projection not in capture.calls]
    if silent:
        raise ValueError(f"FFN output projection(s) {silent} did not run in a forward pass of the calibration batch")
    return [(by_projection[name], capture.calls[name]) for name in capture.order]


class _NormalEquations:
    """Gram matrix ``X^T X``, cross term ``X^T Y`` and target energy of a least-squares fit, in float64."""

    def __init__(self, inputs: int, outputs: int, bias: bool, device: torch.device):
        features = inputs + int(bias)
        self.bias, self.device = bias, device
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.cross = torch.zeros(features, outputs, dtype=torch.float64, device=device)
        self.target_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Add the rows of ``x`` (tokens, inputs) and their targets (tokens, outputs)."""
        x = x.to(self.device, torch.float64)
        target = target.to(self.device, torch.float64)
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.gram += x.T @ x
        self.cross += x.T @ target
        self.target_energy += target.square().sum()
        self.tokens += x.shape[0]

    def solve(self, original: torch.Tensor, ridge: float) -> torch.Tensor:
        """The fitted (inputs [+ 1], outputs) parameters, ridge-penalised towards ``original``."""
        if ridge == 0:
            return torch.linalg.lstsq(self.gram, self.cross).solution
        # Ridge towards the original weights (the bias is not penalised): units that rarely fire on the
        # calibration tokens keep their pretrained weights instead of being pulled to zero.
        penalty = torch.full((self.gram.shape[0],), ridge * self.tokens, dtype=torch.float64, device=self.device)
        if self.bias:
            penalty[-1] = 0
        return torch.linalg.solve(self.gram + torch.diag(penalty), self.cross + penalty[:, None] * original)

    def relative_error(self, theta: torch.Tensor) -> float:
        """``||X theta - Y|| / ||Y||`` over the accumulated tokens."""
        residual = (theta * (self.gram @ theta)).sum() - 2 * (theta * self.cross).sum() + self.target_energy
        return math.sqrt(max(residual.item(), 0.0) / max(self.target_energy.item(), 1e-300))


def _accumulate(
    model: nn.Module,
    site: ActivationSite,
    calls_per_forward: int,
    reference: ActivationFunction,
    batches: Sequence[dict[str, Any]],
    equations: _NormalEquations,
) -> None:
    """Run ``batches`` up to ``site``'s output projection, adding its (ReLU input, original output) tokens."""
    state: dict[str, Any] = {}

    def on_call(name: str, args: tuple, output: Any) -> Any:
        if name == site.name:
            return reference(args[0])  # the layer under fit runs with the original activation
        x = _relu_inputs(capture.records.pop(site.name), args[0], reference, site.gated)
        mask = padding_mask(state["batch"], x)
        if mask is not None:
            equations.add(x[mask], output[mask])
        else:
            equations.add(x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1]))
        state["calls"] += 1
        if state["calls"] == calls_per_forward:
            raise _StopForward
        return None

    modules = submodules(model, (site.name, site.output_projection))
    with ForwardCapture(modules, record="input", on_call=on_call) as capture:
        for batch in batches:
            state["batch"], state["calls"] = batch, 0
            with contextlib.suppress(_StopForward):
                model(**batch)


def _calibrate_site(
    model: nn.Module,
    site: ActivationSite,
    calls_per_forward: int,
    reference: ActivationFunction,
    batches: Sequence[dict[str, Any]],
    ridge: float,
) -> LayerCalibration:
    projection = model.get_submodule(site.output_projection)
    weight = _projection_weight(projection)
    has_bias = projection.bias is not None
    device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    equations = _NormalEquations(weight.shape[0], weight.shape[1], has_bias, device)
    _accumulate(model, site, calls_per_forward, reference, batches, equations)
    if equations.tokens == 0:
        raise ValueError(f"no calibration tokens reached {site.output_projection} (all positions were padding?)")

    original = weight.detach().to(device, torch.float64)
    if has_bias:
        original = torch.cat([original, projection.bias.detach().to(device, torch.float64)[None]], dim=0)
    fitted = equations.solve(original, ridge)
    error_before, error_after = equations.relative_error(original), equations.relative_error(fitted)
    new_weight = fitted[: weight.shape[0]]
    if isinstance(projection, nn.Linear):
        new_weight = new_weight.T
    projection.weight.copy_(new_weight.to(projection.weight.device, projection.weight.dtype))
    if has_bias:
        projection.bias.copy_(fitted[-1].to(projection.bias.device, projection.bias.dtype))
    return LayerCalibration(site.name, site.output_projection, equations.tokens, error_before, error_after)


def calibrate_ffn(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    reference: ActivationSpec | Mapping[str, ActivationSpec],
    ridge: float = DEFAULT_RIDGE,
    sites: Sequence[ActivationSite] | None = None,
) -> CalibrationReport:
    """Refit the FFN output projections of a patched (ReLU/HeLU) model to match its original activation.

    ``model`` already has ReLU/HeLU in its FFN blocks; ``reference`` is the activation they had
    (a name such as ``"gelu"``, a module, or a mapping from activation module name to either, as
    returned by :func:`original_activations`). ``batches`` are unlabeled model inputs (dicts of
    tensors, e.g. from a tokenizer); padding positions (``attention_mask == 0``) are not fitted.

    For each FFN in execution order, weight and bias of its output projection minimise
    ``||W' relu(z) + b' - (W act(z) + b)||^2 + ridge * N * ||W' - W||^2`` over the N collected
    tokens, in float64, where ``z`` comes from the model with every earlier FFN already calibrated.
    """
    ridge = check_ridge(ridge)
    model = unwrap_model(model)
    sites = ffn_sites(model) if sites is None else list(sites)
    unfittable = [site.name for site in sites if site.output_projection is None]
    if unfittable:
        raise ValueError(f"no output projection is known for FFN activation(s) {unfittable}: cannot calibrate them")
    references = reference_functions(reference, sites)
    device = next(model.parameters()).device
    batches = [model_inputs(batch, device) for batch in batches]
    if not batches:
        raise ValueError("calibrate_ffn needs at least one batch of calibration inputs, got none")
    was_training = model.training
    model.eval()
    report = CalibrationReport(ridge=ridge, batches=len(batches))
    try:
        with torch.no_grad():
            for site, calls in _execution_order(model, sites, batches[0]):
                layer = _calibrate_site(model, site, calls, references[site.name], batches, ridge)
                report.layers.append(layer)
                logger.info(
                    "calibrated %s on %d tokens: relative error %.4f -> %.4f",
                    site.output_projection,
                    layer.tokens,
                    layer.error_before,
                    layer.error_after,
                )
    finally:
        model.train(was_training)
    return report


def ffn_output_errors(
    model: nn.Module,
    reference_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: Sequence[ActivationSite] | None = None,
) -> dict[str, float]:
    """Relative error ``||y - y_ref|| / ||y_ref||`` of every FFN output projection's output.

    Both models run the same batches end to end (so errors accumulate through the layers, as in
    use); padding positions are left out. Keyed by output projection name.
    """
    model, reference_model = unwrap_model(model), unwrap_model(reference_model)
    sites = ffn_sites(model) if sites is None else list(sites)
    projections = [site.output_projection for site in sites]
    sums = {name: [0.0, 0.0] for name in projections}
    device = next(model.parameters()).device
    modes = (model.training, reference_model.training)
    model.eval()
    reference_model.eval()
    got = ForwardCapture(submodules(model, projections))
    want = ForwardCapture(submodules(reference_model, projections))
    try:
        with torch.no_grad():
            for raw in batches:
                batch = model_inputs(raw, device)
                got.clear()
                want.clear()
                model(**batch)
                reference_model(**batch)
                for name, totals in sums.items():
                    y, y_ref = got.records[name], want.records[name]
                    mask = padding_mask(batch, y_ref)
                    if mask is not None:
                        y, y_ref = y[mask], y_ref[mask]
                    totals[0] += (y.double() - y_ref.double()).square().sum().item()
                    totals[1] += y_ref.double().square().sum().item()
    finally:
        got.remove()
        want.remove()
        model.train(modes[0])
        reference_model.train(modes[1])
    return {name: math.sqrt(err / max(energy, 1e-300)) for name, (err, energy) in sums.items()}
