"""Calibration at patch time: refit each FFN output projection so that ReLU inputs give the original outputs.

``W2' relu(z) + b'`` is fitted to ``W2 act(z) + b`` on the tokens of a few hundred unlabeled examples:
ridge least squares in float64, layer by layer in execution order, each layer fitted on the inputs
produced by the already calibrated layers before it. Seconds on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.utils.logging import tqdm  # transformers' bar: off with transformers' disable_progress_bar()

from hf_helu.capture import ForwardCapture, submodules
from hf_helu.conversion.batches import model_inputs, padding_mask
from hf_helu.conversion.equations import NormalEquations
from hf_helu.conversion.layerwise import (
    BlockStack,
    CachedBatch,
    NotSequential,
    advance,
    block_stack,
    capture_block_inputs,
    first_tensor,
    without_cache,
)
from hf_helu.conversion.sites import (
    ActivationFunction,
    ActivationSpec,
    ffn_sites,
    reference_functions,
    reference_modules,
)
from hf_helu.families import ActivationSite, unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-3
STRATEGIES = ("auto", "sequential", "rerun")
TARGETS = ("layer", "model")


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
    strategy: str = "sequential"  # "sequential" (one pass per block on cached states) or "rerun" (per layer)
    target: str = "layer"  # what each FFN is fitted to: its own original output, or the original model's

    def to_dict(self) -> dict[str, Any]:
        return {
            "ridge": self.ridge,
            "batches": self.batches,
            "strategy": self.strategy,
            "target": self.target,
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [
            f"calibrated {len(self.layers)} FFN output projection(s), ridge {self.ridge:g}, {self.strategy}, "
            f"target {self.target}"
        ]
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


# One forward of a calibration batch: (the batch, for its padding mask; a call that runs it up to the site).
Run = tuple[Mapping[str, Any], Callable[[], Any]]


def _accumulate(
    model: nn.Module,
    site: ActivationSite,
    calls_per_forward: int,
    reference: ActivationFunction,
    runs: Iterable[Run],
    equations: NormalEquations,
) -> None:
    """Run each of ``runs`` up to ``site``'s output projection, adding its (ReLU input, original output) tokens."""
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
        for batch, run in runs:
            state["batch"], state["calls"] = batch, 0
            with contextlib.suppress(_StopForward):
                run()


def _calibrate_site(
    model: nn.Module,
    site: ActivationSite,
    calls_per_forward: int,
    reference: ActivationFunction,
    runs: Iterable[Run],
    ridge: float,
    accumulate: Callable[..., None] | None = None,
) -> LayerCalibration:
    projection = model.get_submodule(site.output_projection)
    weight = _projection_weight(projection)
    has_bias = projection.bias is not None
    device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    equations = NormalEquations(weight.shape[0], weight.shape[1], has_bias, device)
    if accumulate is None:
        _accumulate(model, site, calls_per_forward, reference, runs, equations)
    else:
        accumulate(model, site, reference, equations=equations)
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


def _by_reruns(
    model: nn.Module,
    sites: Sequence[ActivationSite],
    references: Mapping[str, ActivationFunction],
    batches: Sequence[dict[str, Any]],
    ridge: float,
) -> Iterator[LayerCalibration]:
    """Each layer fitted on inputs from a forward of the whole model up to it: any model, O(depth^2) work."""
    batches = [without_cache(model, batch) for batch in batches]
    runs = [(batch, functools.partial(model, **batch)) for batch in batches]
    for site, calls in _execution_order(model, sites, batches[0]):
        yield _calibrate_site(model, site, calls, references[site.name], runs, ridge)


def _accumulate_to_model(
    model: nn.Module,
    site: ActivationSite,
    reference: ActivationFunction,
    runs: Sequence[tuple[Mapping[str, Any], Callable[[], Any], torch.Tensor]],
    equations: NormalEquations,
) -> None:
    """Like :func:`_accumulate`, but the target is the FFN output that makes the block's output the original
    model's (``runs`` carry it): ``y + (original block output - block output)``, since the block adds ``y``."""
    store: dict[str, torch.Tensor] = {}

    def on_call(name: str, args: tuple, output: Any) -> Any:
        if name == site.name:
            return reference(args[0])
        store["x"] = _relu_inputs(capture.records.pop(site.name), args[0], reference, site.gated)
        store["y"] = output
        return None

    modules = submodules(model, (site.name, site.output_projection))
    with ForwardCapture(modules, record="input", on_call=on_call) as capture:
        for batch, run, wanted in runs:
            output = first_tensor(run())
            x, y = store.pop("x"), store.pop("y")
            if y.shape != output.shape:
                raise ValueError(
                    f"{site.output_projection} outputs {tuple(y.shape)} but its block {tuple(output.shape)}: "
                    "calibration target 'model' needs the FFN output added to the block's output"
                )
            target = y + (wanted - output)
            mask = padding_mask(batch, x)
            if mask is not None:
                equations.add(x[mask], target[mask])
            else:
                equations.add(x.reshape(-1, x.shape[-1]), target.reshape(-1, target.shape[-1]))


def _check_residual(model: nn.Module, site: ActivationSite, run: Callable[[], Any]) -> None:
    """The block's output moves exactly as its FFN output does (a residual add, no norm after): else ValueError."""
    shift = 1.0
    with ForwardCapture(submodules(model, (site.output_projection,)), record=None, on_call=lambda n, a, o: o + shift):
        shifted = first_tensor(run())
    plain = first_tensor(run())
    moved = shifted.double() - plain.double()
    if not torch.allclose(moved, torch.full_like(moved, shift), atol=1e-3 * (1 + plain.abs().max().item())):
        raise ValueError(
            f"the output of {site.output_projection} is not added unchanged to its block's output (a norm after the "
            "residual add?): calibration target 'model' does not apply; use target 'layer'"
        )


def _sequential(
    model: nn.Module,
    stack: BlockStack,
    cached: Sequence[CachedBatch],
    references: Mapping[str, ActivationFunction],
    ridge: float,
    target: str = "layer",
) -> Iterator[LayerCalibration]:
    """Each layer fitted on one pass through its block of the cached hidden states, which then go one block on.

    With ``target="model"`` a second stream of hidden states, the original model's, goes along (one more block
    pass per layer): each FFN is fitted so that its block's output matches the original model's.
    """
    last = max(i for i, site in enumerate(stack.sites) if site is not None)
    original = [item.hidden for item in cached] if target == "model" else None
    for index, (block, site) in enumerate(zip(stack.blocks, stack.sites, strict=True)):
        if original is not None:
            swap = {site.name: references[site.name]} if site is not None else {}
            with reference_modules(model, swap):
                pairs = zip(cached, original, strict=True)
                original = [first_tensor(item.calls[index].run(block, hidden)) for item, hidden in pairs]
        if site is not None:
            runs = [(item.batch, functools.partial(item.calls[index].run, block, item.hidden)) for item in cached]
            if original is None:
                yield _calibrate_site(model, site, 1, references[site.name], runs, ridge)
            else:
                with reference_modules(model, {site.name: references[site.name]}):
                    _check_residual(model, site, runs[0][1])
                planned = [(batch, run, wanted) for (batch, run), wanted in zip(runs, original, strict=True)]
                yield _calibrate_site(
                    model,
                    site,
                    1,
                    references[site.name],
                    runs,
                    ridge,
                    accumulate=functools.partial(_accumulate_to_model, runs=planned),
                )
        if index == last:
            return
        advance(stack, index, cached)


def _plan(
    model: nn.Module, sites: Sequence[ActivationSite], batches: Sequence[dict[str, Any]], strategy: str
) -> tuple[str, BlockStack | None, list[CachedBatch]]:
    """The strategy that will run, with the stack and the first block's cached inputs when it is sequential."""
    if strategy == "rerun":
        return "rerun", None, []
    try:
        stack = block_stack(model, sites)
        return "sequential", stack, [capture_block_inputs(model, stack, batch) for batch in batches]
    except NotSequential as why:
        if strategy == "sequential":
            raise ValueError(f"calibration strategy 'sequential' is not possible for this model: {why}") from None
        logger.info("calibrating by re-running the model for every layer: %s", why)
        return "rerun", None, []


def calibrate_ffn(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    reference: ActivationSpec | Mapping[str, ActivationSpec],
    ridge: float = DEFAULT_RIDGE,
    sites: Sequence[ActivationSite] | None = None,
    strategy: str = "auto",
    target: str = "layer",
) -> CalibrationReport:
    """Refit the FFN output projections of a patched (ReLU/HeLU) model to match its original activation.

    ``model`` already has ReLU/HeLU in its FFN blocks; ``reference`` is the activation they had
    (a name such as ``"gelu"``, a module, or a mapping from activation module name to either, as
    returned by :func:`original_activations`). ``batches`` are unlabeled model inputs (dicts of
    tensors, e.g. from a tokenizer); padding positions (``attention_mask == 0``) are not fitted.

    For each FFN in execution order, weight and bias of its output projection minimise
    ``||W' relu(z) + b' - (W act(z) + b)||^2 + ridge * N * ||W' - W||^2`` over the N collected
    tokens, in float64, where ``z`` comes from the model with every earlier FFN already calibrated.

    ``strategy``: ``"sequential"`` caches the hidden states between blocks and runs each block once per layer
    (work linear in depth; :mod:`hf_helu.conversion.layerwise` says which models allow it and what it holds in
    memory), ``"rerun"`` runs the model from its inputs up to each layer (any model, work quadratic in depth),
    ``"auto"`` (default) the first when the model allows it. Both give the same fit up to float rounding.

    ``target``: ``"layer"`` (default) fits each FFN to its own original output on the converted model's inputs, as
    above; ``"model"`` (sequential only; blocks that add their FFN output to the residual stream, as pre-norm
    decoders do) fits it to the output that makes its block's output the original model's, so that each FFN also
    corrects what the converted layers before it changed (one more block pass per layer for the original stream).
    """
    ridge = check_ridge(ridge)
    if strategy not in STRATEGIES:
        raise ValueError(f"calibration strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if target not in TARGETS:
        raise ValueError(f"calibration target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target == "model" and strategy == "rerun":
        raise ValueError("calibration target 'model' needs strategy 'sequential' (or 'auto')")
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
    try:
        with torch.no_grad():
            strategy, stack, cached = _plan(model, sites, batches, "sequential" if target == "model" else strategy)
            report = CalibrationReport(ridge=ridge, batches=len(batches), strategy=strategy, target=target)
            if strategy == "sequential":
                layers = _sequential(model, stack, cached, references, ridge, target)
            else:
                layers = _by_reruns(model, sites, references, batches, ridge)
            for layer in tqdm(layers, total=len(sites), desc="calibrate", unit="layer", leave=False):
                report.layers.append(layer)
                logger.info(
                    "calibrated %s on %d tokens: relative error %.4f -> %.4f",
                    layer.output_projection,
                    layer.tokens,
                    layer.error_before,
                    layer.error_after,
                )
    finally:
        model.train(was_training)
    return report
