"""Calibration at patch time: refit each FFN output projection so that ReLU inputs give the original outputs.

``W2' relu(z) + b'`` is fitted to ``W2 act(z) + b`` on the tokens of a few hundred unlabeled examples:
ridge least squares (normal equations summed in float32 as the tokens stream by, solved in float64), layer by
layer in execution order, each layer fitted on the inputs produced by the already calibrated layers before it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from hf_helu.capture import ForwardCapture, submodules
from hf_helu.conversion.batches import model_inputs, padding_mask
from hf_helu.conversion.equations import NormalEquations
from hf_helu.conversion.heap import release_freed_memory
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
from hf_helu.conversion.report import DEFAULT_RIDGE, CalibrationReport, LayerCalibration
from hf_helu.conversion.sites import (
    ActivationFunction,
    ActivationSpec,
    ffn_sites,
    reference_functions,
    reference_modules,
)
from hf_helu.families import ActivationSite, unwrap_model

logger = logging.getLogger(__name__)

STRATEGIES = ("auto", "sequential", "rerun")
TARGETS = ("layer", "model")
# How target "model" keeps each batch's FFN-projection input until the refitted projection moves the stream on:
# bfloat16 halves the largest tensor of a calibration (306 MB of float32 for SmolLM2-135M's CLI defaults).
KEPT_DTYPE = torch.bfloat16


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
) -> LayerCalibration:
    projection = model.get_submodule(site.output_projection)
    weight = _projection_weight(projection)
    has_bias = projection.bias is not None
    device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    equations = NormalEquations(weight.shape[0], weight.shape[1], has_bias, device)
    _accumulate(model, site, calls_per_forward, reference, runs, equations)
    return _solve_site(projection, site, equations, ridge)


def _solve_site(
    projection: nn.Module, site: ActivationSite, equations: NormalEquations, ridge: float
) -> LayerCalibration:
    """Solve the accumulated normal equations and write the fitted weight (and bias) into ``projection``."""
    weight = _projection_weight(projection)
    has_bias = projection.bias is not None
    device = equations.device
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


def _residual_tolerance(plain: torch.Tensor) -> float:
    """How far a block's output may move from ``output + shift`` when its FFN output is shifted by ``shift`` = 1 and
    the FFN output is added unchanged: the two forwards round differently, by a few units in the last place of the
    largest hidden value in the compute dtype (``64 eps (1 + max |h|)``: float32, the dtype calibration computes in,
    6e-5 at max |h| = 10; float16 0.06; bfloat16 0.5 at max |h| = 0, useless at 10, which is why
    :func:`hf_helu.convert_model` calibrates half-precision models in float32). A norm after the add moves the output
    by about the shift itself (1), far above the float32 bound."""
    return 64 * torch.finfo(plain.dtype).eps * (1 + plain.abs().max().item())


class _HeldProjection(nn.Module):
    """Stands in for an FFN output projection: keeps its input and outputs the constant ``value`` instead of
    computing anything (0: the block's output is then exactly the rest of the block; 1: the residual check)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features, self.value = out_features, 0.0
        self.input: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input = x
        return x.new_full((*x.shape[:-1], self.out_features), self.value)


def _check_residual(site: ActivationSite, run: Callable[[], Any], held: _HeldProjection, rest: torch.Tensor) -> None:
    """The block's output moves exactly as its FFN output does (a residual add, no norm after): else ValueError.
    ``rest``: the block's output of ``run`` with the FFN output 0; here it is 1."""
    shift = 1.0
    held.value = shift
    try:
        shifted = first_tensor(run())
    finally:
        held.value = 0.0
    moved = shifted.double() - rest.double()
    if not torch.allclose(moved, torch.full_like(moved, shift), rtol=0, atol=_residual_tolerance(rest)):
        raise ValueError(
            f"the output of {site.output_projection} is not added unchanged to its block's output (a norm after the "
            "residual add?): calibration target 'model' does not apply; use target 'layer'"
        )


def _fit_to_model(
    model: nn.Module,
    block: nn.Module,
    site: ActivationSite,
    index: int,
    cached: Sequence[CachedBatch],
    original: Sequence[torch.Tensor],
    ridge: float,
) -> LayerCalibration:
    """Target ``"model"`` for the FFN of block ``index``, in one pass of the block over the cached hidden states.

    The block runs as converted (ReLU) with its output projection replaced by a stand-in that keeps the
    projection's input ``x`` and outputs 0: the block's output is then ``rest``, all of the block but its FFN
    output, which the block adds unchanged (:func:`_check_residual`); the wanted FFN output is
    ``original - rest``. After the fit the block's new output is ``rest + projection(x)``: no second pass, and the
    old projection is never computed. ``x`` of every batch is kept until then (tokens x d_ff values, in one block
    freed whole, as :data:`KEPT_DTYPE`: the fit reads ``x`` in full precision as it streams by, only the stream
    the next layers are fitted on carries bfloat16's rounding of it, ``2^-9`` relative per value, far below the
    fit's error of 1e-2 and more), and the hidden states are updated in place (:mod:`hf_helu.conversion.heap`).
    """
    projection = model.get_submodule(site.output_projection)
    weight = _projection_weight(projection)
    held = _HeldProjection(weight.shape[1])
    positions = [item.hidden.shape[:-1].numel() for item in cached]
    kept: torch.Tensor | None = None  # x of every batch, in one block (freed whole, no heap holes)
    device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    equations = NormalEquations(weight.shape[0], weight.shape[1], projection.bias is not None, device)
    with reference_modules(model, {site.output_projection: held}):
        for number, (item, wanted) in enumerate(zip(cached, original, strict=True)):
            run = functools.partial(item.calls[index].run, block, item.hidden)
            rest = first_tensor(run())
            x = held.input
            if rest.shape != (*x.shape[:-1], held.out_features):
                raise ValueError(
                    f"{site.output_projection} outputs {(*x.shape[:-1], held.out_features)} but its block "
                    f"{tuple(rest.shape)}: calibration target 'model' needs the FFN output added to the block's output"
                )
            if number == 0:
                _check_residual(site, run, held, rest)
                kept = x.new_empty(sum(positions), x.shape[-1], dtype=KEPT_DTYPE)
            item.hidden.copy_(rest)  # the block's input is not needed any more: the stream moves on in place
            target = wanted - rest
            mask = padding_mask(item.batch, x)
            if mask is not None:
                equations.add(x[mask], target[mask])
            else:
                equations.add(x.reshape(-1, x.shape[-1]), target.reshape(-1, target.shape[-1]))
            start = sum(positions[:number])
            kept[start : start + positions[number]] = x.reshape(-1, x.shape[-1])
            x_dtype = x.dtype
            del rest, target, x
    held.input = None
    layer = _solve_site(projection, site, equations, ridge)
    for number, item in enumerate(cached):
        start = sum(positions[:number])
        item.hidden += projection(kept[start : start + positions[number]].to(x_dtype)).view_as(item.hidden)
    return layer


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
    pass per layer): each FFN is fitted so that its block's output matches the original model's
    (:func:`_fit_to_model`, which also moves the converted stream on without another pass).
    """
    last = max(i for i, site in enumerate(stack.sites) if site is not None)
    original = [item.hidden.clone() for item in cached] if target == "model" else None
    for index, (block, site) in enumerate(zip(stack.blocks, stack.sites, strict=True)):
        if original is not None:
            swap = {site.name: references[site.name]} if site is not None else {}
            with reference_modules(model, swap):
                for item, hidden in zip(cached, original, strict=True):  # in place: no second stream at once
                    hidden.copy_(first_tensor(item.calls[index].run(block, hidden)))
            if site is not None:
                layer = _fit_to_model(model, block, site, index, cached, original, ridge)
                release_freed_memory()  # this layer's transients: the next one starts from live tensors only
                yield layer
                if index == last:
                    return
                continue
        if site is not None:
            runs = [(item.batch, functools.partial(item.calls[index].run, block, item.hidden)) for item in cached]
            yield _calibrate_site(model, site, 1, references[site.name], runs, ridge)
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
        cached = [capture_block_inputs(model, stack, batch) for batch in batches]
        release_freed_memory()  # the forwards' intermediates, freed between the kept hidden states
        return "sequential", stack, cached
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
    progress: bool = False,
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

    ``progress``: a tqdm progress bar on stderr, one step per calibrated layer, with the fit tokens per second.
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
            for layer in _with_progress(layers, len(sites), progress):
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


def _with_progress(layers: Iterable[LayerCalibration], total: int, progress: bool) -> Iterator[LayerCalibration]:
    """``layers`` as they are calibrated, shown on a tqdm bar (layers, fit tokens per second) when ``progress``."""
    with tqdm(total=total, desc="calibrating", unit="layer", disable=not progress, dynamic_ncols=True) as bar:
        started = time.perf_counter()
        for layer in layers:
            now = time.perf_counter()
            bar.set_postfix_str(
                f"{layer.tokens / max(now - started, 1e-9):,.0f} tokens/s, error {layer.error_after:.3f}"
            )
            bar.update()
            started = now
            yield layer
