"""Dying-unit diagnostics: which FFN units never fire, how sparse the FFN is, what HeLU's margin rescues.

:class:`ActivationMonitor` puts a forward hook on each FFN activation module and accumulates, over
every forward pass while it is attached, per activation ("layer"):

- **dead fraction**: share of units whose output was never > 0 (units are the features along the
  last dim; for an activation inside a convolution block, e.g. Wav2Vec2's feature encoder, the
  channels along dim 1);
- **zero fraction**: share of output elements exactly 0 (the sparsity a sparse FFN kernel could skip);
- **band fraction** (HeLU, or any activation when an ``alpha`` is given): share of elements whose
  *input* lies in the hysteresis band ``(-alpha, 0]``: zero output, yet they still receive gradient.
  That is exactly where HeLU differs from ReLU.

The counters stay on the model's device and are updated with tensor ops only, so the monitor adds no
host synchronisation to the forward pass; the one sync happens in :meth:`ActivationMonitor.stats`.
Under Accelerate (or any ``torch.distributed`` job) ``stats`` sums the counters over processes, so the
numbers are those of one process that saw all the data.

Padding: a padded position must not make a unit look alive, so positions can be masked out. By
default the monitor reads the ``attention_mask`` the model is called with (keyword or positional):
it is applied to every activation whose positions it matches one to one, and for speech models
(Wav2Vec2, HuBERT, WavLM), whose mask counts audio samples, it is converted to frames with the
model's own ``_get_feature_vector_attention_mask`` (for the feature encoder's conv layers, to the
frames of each layer with the config's ``conv_kernel`` / ``conv_stride``). An activation the captured
mask cannot be mapped onto (e.g. a decoder layer of an encoder-decoder model) is counted over all
positions and reported with ``unmasked_calls > 0``. Setting ``monitor.token_mask`` overrides this: it
must have one entry per position of every monitored activation (shape = output shape without the
units dim), or the forward fails with an error. It applies to every forward pass until it is changed, set to ``None``
(back to the captured mask) or the monitor is detached.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_helu.activation import HeLU, validate_alpha
from hf_helu.atomic import atomic_write_bytes, atomic_write_json
from hf_helu.backends import threshold
from hf_helu.families import Scope, find_activation_sites, supported_families

# Counter slots per activation, kept in one int64 tensor so the cross-process reduction is one call.
_TOKENS, _ZEROS, _BAND, _CALLS, _UNMASKED_CALLS, _NAN_CALLS = range(6)
_NUM_COUNTS = 6


@dataclass(frozen=True)
class LayerActivationStats:
    """Accumulated statistics of one activation module (one FFN layer)."""

    name: str
    layer_index: int | None
    units: int
    dead_units: int
    tokens: int
    zero_elements: int
    band_elements: int | None
    alpha: float | None
    calls: int
    unmasked_calls: int
    nan_calls: int = 0
    dead_indices: tuple[int, ...] = ()

    @property
    def elements(self) -> int:
        return self.tokens * self.units

    @property
    def dead_fraction(self) -> float:
        return self.dead_units / self.units

    @property
    def zero_fraction(self) -> float | None:
        """None when every position was masked out (nothing observed)."""
        return self.zero_elements / self.elements if self.elements else None

    @property
    def band_fraction(self) -> float | None:
        if self.band_elements is None:
            return None
        return self.band_elements / self.elements if self.elements else None

    def to_dict(self, include_indices: bool = False) -> dict[str, Any]:
        """JSON-able form; ``include_indices`` adds the list of dead unit indices."""
        data = {
            "name": self.name,
            "layer_index": self.layer_index,
            "units": self.units,
            "dead_units": self.dead_units,
            "dead_fraction": self.dead_fraction,
            "tokens": self.tokens,
            "zero_fraction": self.zero_fraction,
            "band_fraction": self.band_fraction,
            "alpha": self.alpha,
            "calls": self.calls,
            "unmasked_calls": self.unmasked_calls,
            "nan_calls": self.nan_calls,
        }
        if include_indices:
            data["dead_indices"] = list(self.dead_indices)
        return data


@dataclass(frozen=True)
class ActivationStats:
    """Per-layer statistics of a monitored model; ``to_dict()`` is JSON-able, ``table()`` printable."""

    layers: tuple[LayerActivationStats, ...]

    @property
    def dead_fraction(self) -> float:
        """Dead units over all monitored units (all layers together)."""
        return sum(layer.dead_units for layer in self.layers) / sum(layer.units for layer in self.layers)

    @property
    def zero_fraction(self) -> float | None:
        """Zero outputs over all observed output elements (all layers together)."""
        elements = sum(layer.elements for layer in self.layers)
        return sum(layer.zero_elements for layer in self.layers) / elements if elements else None

    @property
    def band_fraction(self) -> float | None:
        """Band elements over the observed elements of the layers that have a band (else None)."""
        banded = [layer for layer in self.layers if layer.band_elements is not None]
        elements = sum(layer.elements for layer in banded)
        if not banded:
            return None
        return sum(layer.band_elements for layer in banded) / elements if elements else None

    @property
    def dead_fractions(self) -> list[float]:
        """Dead fraction of each layer, in monitor order (what :func:`plot_dead_fraction` plots)."""
        return [layer.dead_fraction for layer in self.layers]

    def history_entry(self, step: int) -> dict[str, Any]:
        """``{"step": step, "dead_fraction": [per layer]}``: one point of a training history."""
        return {"step": int(step), "dead_fraction": self.dead_fractions}

    def to_dict(self, include_indices: bool = False) -> dict[str, Any]:
        """JSON-able form (what the recipes store in results.json)."""
        return {
            "dead_fraction": self.dead_fraction,
            "zero_fraction": self.zero_fraction,
            "band_fraction": self.band_fraction,
            "units": sum(layer.units for layer in self.layers),
            "dead_units": sum(layer.dead_units for layer in self.layers),
            "layers": [layer.to_dict(include_indices) for layer in self.layers],
        }

    def table(self) -> str:
        """The per-layer table as text (percentages), with an ``all`` row."""
        width = max(len("activation"), *(len(layer.name) for layer in self.layers))
        header = f"{'layer':>5}  {'activation':<{width}}  {'units':>6}  {'dead':>6}  {'dead %':>7}  "
        header += f"{'zeros %':>7}  {'band %':>7}  {'tokens':>9}"
        lines = [header, "-" * len(header)]

        def percent(fraction: float | None) -> str:
            return "-" if fraction is None else f"{100 * fraction:7.2f}"

        def row(index: str, name: str, units: int, dead: int, dead_f, zero_f, band_f, tokens: str) -> str:
            return (
                f"{index:>5}  {name:<{width}}  {units:>6}  {dead:>6}  {percent(dead_f):>7}  "
                f"{percent(zero_f):>7}  {percent(band_f):>7}  {tokens:>9}"
            )

        for position, layer in enumerate(self.layers):
            index = str(layer.layer_index if layer.layer_index is not None else position)
            lines.append(
                row(
                    index,
                    layer.name,
                    layer.units,
                    layer.dead_units,
                    layer.dead_fraction,
                    layer.zero_fraction,
                    layer.band_fraction,
                    str(layer.tokens),
                )
            )
        lines.append("-" * len(header))
        lines.append(
            row(
                "all",
                "",
                sum(layer.units for layer in self.layers),
                sum(layer.dead_units for layer in self.layers),
                self.dead_fraction,
                self.zero_fraction,
                self.band_fraction,
                "",
            )
        )
        nan = [layer.name for layer in self.layers if layer.nan_calls]
        if nan:
            lines.append(f"warning: NaN/inf outputs (statistics unreliable) in: {', '.join(nan)}")
        unmasked = [layer.name for layer in self.layers if layer.unmasked_calls]
        if unmasked:
            lines.append(f"note: no padding mask could be applied to some calls of: {', '.join(unmasked)}")
        alphas = sorted({layer.alpha for layer in self.layers if layer.alpha is not None})
        if alphas:
            lines.append(
                "band % = inputs in (-alpha, 0]: zero output, gradient still passes (alpha "
                + ", ".join(map(str, alphas))
                + ")"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class _Site:
    """One monitored activation module and its on-device counters."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        layer_index: int | None,
        alpha: float | None,
        channels_first: bool = False,
        conv_depth: int | None = None,
    ):
        self.name = name
        self.module = module
        self.layer_index = layer_index
        self.alpha = alpha
        self.channels_first = channels_first  # units along dim 1 (the activation of a conv block)
        self.conv_depth = conv_depth  # feature-encoder conv layers applied before it (frames per layer)
        self.fired: torch.Tensor | None = None  # bool [units]: output > 0 seen at an unmasked position
        self.counts: torch.Tensor | None = None  # int64 [_NUM_COUNTS]


def _site_alpha(module: nn.Module, alpha: float | None) -> float | None:
    if alpha is not None:
        return alpha
    return module.alpha if isinstance(module, HeLU) else None


_FEATURE_ENCODER_LAYER = re.compile(r"(?:^|\.)conv_layers\.(\d+)\.[^.]+$")


def _layout(model: nn.Module | None, name: str | None) -> tuple[bool, int | None]:
    """(channels_first, conv_depth) of the activation ``model.<name>``: channels-first when its parent block holds
    a convolution (its input is (batch, channels, time...)); conv_depth for layer i of a speech feature encoder."""
    if model is None or name is None:
        return False, None
    parent = model.get_submodule(name.rpartition(".")[0])
    channels_first = any(isinstance(child, nn.modules.conv._ConvNd) for child in parent.children())
    match = _FEATURE_ENCODER_LAYER.search(name)
    return channels_first, int(match.group(1)) + 1 if channels_first and match else None


def _resolve_sites(
    model: nn.Module | None,
    sites: Mapping[str, nn.Module] | Sequence[Any] | None,
    scope: Scope,
) -> list[tuple[str, nn.Module, int | None]]:
    if sites is None:
        if model is None:
            raise ValueError("ActivationMonitor needs a model, explicit sites, or both; got neither")
        resolved = [(site.name, site.module, site.layer_index) for site in find_activation_sites(model, scope=scope)]
        if not resolved:
            raise ValueError(
                f"no activation found in {type(model).__name__} for scope={scope!r} (supported families: "
                f"{', '.join(supported_families())}, plus FFN blocks named like mlp/ffn/intermediate); "
                "pass sites={name: module} to monitor modules explicitly"
            )
    elif isinstance(sites, Mapping):
        resolved = [(name, module, None) for name, module in sites.items()]
    elif isinstance(sites, Sequence) and not isinstance(sites, str):
        resolved = []
        for site in sites:
            if not all(hasattr(site, attr) for attr in ("name", "module")):
                raise TypeError(
                    f"sites must be a mapping name -> module or a sequence of ActivationSite; got an item {site!r}"
                )
            resolved.append((site.name, site.module, getattr(site, "layer_index", None)))
    else:
        raise TypeError(
            f"sites must be a mapping name -> module or a sequence of ActivationSite, got {type(sites).__name__}"
        )
    if not resolved:
        raise ValueError(f"sites is empty: nothing to monitor (got {sites!r})")
    seen: dict[int, str] = {}
    for name, module, _ in resolved:
        if not isinstance(module, nn.Module):
            raise TypeError(f"activation {name!r} must be an nn.Module to be hooked, got {type(module).__name__}")
        if id(module) in seen:
            raise ValueError(
                f"activations {seen[id(module)]!r} and {name!r} are the same module object; "
                "its hook would count both layers together"
            )
        seen[id(module)] = name
    return resolved


class ActivationMonitor:
    """Forward hooks on activation modules that count dead units, zeros and HeLU band elements.

    Use as a context manager (hooks removed on exit, even on error) or with ``attach()``/``detach()``::

        with ActivationMonitor(model) as monitor:
            for batch in eval_loader:
                model(**batch)
        stats = monitor.stats(accelerator)   # every process must call it under Accelerate
        print(stats.table()); results["activations"] = stats.to_dict()

    ``model`` alone monitors the FFN activations found by :func:`hf_helu.families.find_activation_sites`
    (``scope`` as there); ``sites`` (a mapping name -> module, or ActivationSite objects) monitors
    those modules instead. ``alpha`` reports the band ``(-alpha, 0]`` for every activation (by default
    only HeLU modules get one, with their own alpha). ``capture_attention_mask`` reads the model's
    ``attention_mask`` argument to skip padded positions (see the module docstring).

    Every call of a hooked module is counted: with gradient checkpointing the recomputation in the
    backward counts positions twice (the fractions do not change, ``tokens`` and ``calls`` double).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        sites: Mapping[str, nn.Module] | Sequence[Any] | None = None,
        *,
        scope: Scope = "ffn",
        alpha: float | None = None,
        capture_attention_mask: bool = True,
    ):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # DDP forwards its inputs to the inner model, whose hooks see them
        if alpha is not None:
            alpha = validate_alpha(alpha)
        self.model = model
        qualified = {id(m): n for n, m in model.named_modules()} if model is not None else {}
        self._sites = [
            _Site(name, module, layer_index, _site_alpha(module, alpha), *_layout(model, qualified.get(id(module))))
            for name, module, layer_index in _resolve_sites(model, sites, scope)
        ]
        self.capture_attention_mask = capture_attention_mask and model is not None
        self.token_mask: torch.Tensor | None = None
        self._captured_mask: torch.Tensor | None = None
        self._frame_masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._forward_signature = None

    @property
    def names(self) -> list[str]:
        return [site.name for site in self._sites]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- hooks ----------------------------------------------------------------------------------

    def attach(self) -> ActivationMonitor:
        """Register the hooks (counters keep accumulating across attach/detach until ``reset()``)."""
        if self._handles:
            raise RuntimeError("ActivationMonitor is already attached; detach() it first")
        try:
            for site in self._sites:
                self._handles.append(site.module.register_forward_hook(self._make_hook(site)))
            if self.capture_attention_mask:
                self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
                self._handles.append(self.model.register_forward_hook(self._release_mask, always_call=True))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook this monitor registered (and forget ``token_mask``). Safe to call twice."""
        while self._handles:
            self._handles.pop().remove()
        self.token_mask = None
        self._captured_mask = None
        self._frame_masks.clear()

    def reset(self) -> None:
        """Forget everything counted so far (e.g. at the start of each evaluation)."""
        for site in self._sites:
            site.fired = None
            site.counts = None

    def __enter__(self) -> ActivationMonitor:
        return self.attach()

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            if self._forward_signature is None:
                self._forward_signature = inspect.signature(module.forward)
            with contextlib.suppress(TypeError):
                mask = self._forward_signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        self._captured_mask = mask if isinstance(mask, torch.Tensor) else None
        self._frame_masks.clear()

    def _release_mask(self, *unused) -> None:
        self._captured_mask = None
        self._frame_masks.clear()

    def _mask_for(self, site: _Site, positions: torch.Size, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """The bool mask over ``positions`` for this call, and whether a mask was wanted but not found."""
        if self.token_mask is not None:
            if tuple(self.token_mask.shape) != tuple(positions):
                raise ValueError(
                    f"monitor.token_mask has shape {tuple(self.token_mask.shape)} but activation {site.name!r} "
                    f"has positions of shape {tuple(positions)} (its output shape without the units dim); "
                    "set token_mask to a mask with one entry per position, or to None"
                )
            return self.token_mask.to(device=device, dtype=torch.bool), False
        mask = self._captured_mask
        if mask is None:
            return None, False
        if tuple(mask.shape) == tuple(positions):
            return mask.to(device=device, dtype=torch.bool), False
        to_frames = getattr(self.model, "_get_feature_vector_attention_mask", None)
        if to_frames is not None and mask.dim() == 2 and len(positions) == 2 and mask.shape[0] == positions[0]:
            key = (site.conv_depth or 0, int(positions[1]), device)
            if key not in self._frame_masks:
                if site.conv_depth is None:
                    frames = to_frames(int(positions[1]), mask)
                else:
                    frames = self._conv_frames(site.conv_depth, int(positions[1]), mask)
                self._frame_masks[key] = frames.to(device=device, dtype=torch.bool)
            return self._frame_masks[key], False
        return None, True

    def _conv_frames(self, depth: int, frames: int, mask: torch.Tensor) -> torch.Tensor:
        """Frame mask after the first ``depth`` feature-encoder conv layers (no padding in those convs)."""
        config = self.model.config
        lengths = mask.sum(-1)
        for kernel, stride in zip(config.conv_kernel[:depth], config.conv_stride[:depth], strict=True):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return torch.arange(frames, device=mask.device)[None, :] < lengths[:, None]

    def _make_hook(self, site: _Site):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"activation {site.name!r} returned {type(output).__name__}; expected a tensor")
            with torch.no_grad():
                self._count(site, args[0] if args else None, output.detach())

        return hook

    def _count(self, site: _Site, inputs: Any, output: torch.Tensor) -> None:
        if site.channels_first and output.dim() >= 3:  # (batch, channels, time...) -> channels last
            output = output.movedim(1, -1)
            inputs = inputs.movedim(1, -1) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 3 else inputs
        units = output.shape[-1]
        if site.alpha is not None and (not isinstance(inputs, torch.Tensor) or inputs.shape != output.shape):
            raise ValueError(
                f"activation {site.name!r}: the hysteresis band needs the activation input with the output's "
                f"shape {tuple(output.shape)}, got {type(inputs).__name__}"
                + (f" of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else "")
            )
        if site.fired is None:
            # Normal (not inference-mode) tensors, so they can be updated under any grad mode later.
            with torch.inference_mode(False):
                site.fired = torch.zeros(units, dtype=torch.bool, device=output.device)
                site.counts = torch.zeros(_NUM_COUNTS, dtype=torch.int64, device=output.device)
        elif site.fired.numel() != units:
            raise ValueError(f"activation {site.name!r} had {site.fired.numel()} units before and now {units}")
        mask, unmasked = self._mask_for(site, output.shape[:-1], output.device)
        # Few full passes over the output, all reductions (PyTorch's bool .sum() is slow on CPU, count_nonzero
        # is not). Padded rows are multiplied to 0: never > 0, and their zeros are subtracted again.
        flat = output.reshape(-1, units)
        counts = site.counts
        counts[_CALLS] += 1
        if unmasked:
            counts[_UNMASKED_CALLS] += 1
        if flat.shape[0] == 0:
            return
        if mask is None:
            kept, padded_elements = flat.shape[0], 0
        else:
            keep = mask.reshape(-1, 1)
            kept = keep.sum()
            padded_elements = (flat.shape[0] - kept) * units
            flat = flat * keep
        column_max = flat.amax(0)
        site.fired |= column_max > 0
        counts[_NAN_CALLS] += column_max.isnan().any()  # a NaN hides the column's maximum
        counts[_TOKENS] += kept
        counts[_ZEROS] += torch.count_nonzero(flat == 0) - padded_elements
        if site.alpha is not None:
            z = inputs.detach().reshape(-1, units)
            band = (z <= 0) & (z > threshold(site.alpha, z.dtype))  # HeLU's own (cached) threshold
            if mask is not None:
                band &= keep
            counts[_BAND] += torch.count_nonzero(band)

    # -- results --------------------------------------------------------------------------------

    def stats(self, accelerator: Any = None) -> ActivationStats:
        """Statistics over everything seen since attach/reset, summed over all processes.

        With ``accelerator`` the counters are reduced with ``accelerator.reduce``; without it, inside an
        initialised ``torch.distributed`` job with several processes, with ``all_reduce``. Both are
        collective: every process must call ``stats``. (Accelerate's ``even_batches`` repeats samples
        to fill the last batch; the repeats are counted like any other data.)
        """
        reduce = _reducer(accelerator)
        device = self._device()
        units = torch.tensor(
            [site.fired.numel() if site.fired is not None else 0 for site in self._sites], device=device
        )
        seen = (units > 0).to(torch.int64)
        totals = reduce(torch.stack([units * seen, seen]))
        # Every process that saw an activation must agree on its width; one that saw none contributes zeros.
        global_units = []
        for site, local, (total, count) in zip(self._sites, units.tolist(), totals.T.tolist(), strict=True):
            if count == 0:
                raise ValueError(
                    f"activation {site.name!r} was never called since attach()/reset(): run forward passes "
                    "with the monitor attached before asking for stats"
                )
            width = total // count
            if total % count or (local and local != width):
                raise ValueError(f"activation {site.name!r} has different widths on different processes")
            global_units.append(width)
        parts = []
        for site, width in zip(self._sites, global_units, strict=True):
            if site.fired is None:
                parts += [torch.zeros(_NUM_COUNTS + width, dtype=torch.int64, device=device)]
            else:
                parts += [site.counts.to(device), site.fired.to(device=device, dtype=torch.int64)]
        flat = reduce(torch.cat(parts)).cpu()
        layers, offset = [], 0
        for site, width in zip(self._sites, global_units, strict=True):
            counts = flat[offset : offset + _NUM_COUNTS].tolist()
            fired = flat[offset + _NUM_COUNTS : offset + _NUM_COUNTS + width]
            offset += _NUM_COUNTS + width
            layers.append(
                LayerActivationStats(
                    name=site.name,
                    layer_index=site.layer_index,
                    units=width,
                    dead_units=int((fired == 0).sum()),
                    dead_indices=tuple((fired == 0).nonzero().flatten().tolist()),
                    tokens=counts[_TOKENS],
                    zero_elements=counts[_ZEROS],
                    band_elements=counts[_BAND] if site.alpha is not None else None,
                    alpha=site.alpha,
                    calls=counts[_CALLS],
                    unmasked_calls=counts[_UNMASKED_CALLS],
                    nan_calls=counts[_NAN_CALLS],
                )
            )
        return ActivationStats(tuple(layers))

    def _device(self) -> torch.device:
        for site in self._sites:
            if site.counts is not None:
                return site.counts.device
        for site in self._sites:
            for tensor in site.module.parameters():
                return tensor.device
        if self.model is not None:
            for tensor in self.model.parameters():
                return tensor.device
        return torch.device("cpu")


def _reducer(accelerator: Any):
    if accelerator is not None:
        if accelerator.num_processes == 1:
            return lambda tensor: tensor
        return lambda tensor: accelerator.reduce(tensor, reduction="sum")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:

        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            return tensor

        return all_reduce
    return lambda tensor: tensor


# -- plotting ------------------------------------------------------------------------------------


def _check_history(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    if not isinstance(history, Mapping) or not history:
        raise ValueError(
            'history must be a non-empty mapping {activation: [{"step": int, "dead_fraction": [per layer]}, ...]}, '
            f"got {history!r}"
        )
    for name, points in history.items():
        if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or not points:
            raise ValueError(f"history[{name!r}] must be a non-empty list of points, got {points!r}")
        layers = None
        for point in points:
            if not isinstance(point, Mapping) or "step" not in point or "dead_fraction" not in point:
                raise ValueError(
                    f'history[{name!r}] has a point {point!r}; expected {{"step": ..., "dead_fraction": [...]}}'
                )
            step, fractions = point["step"], point["dead_fraction"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"history[{name!r}] has step {step!r}; expected an int")
            if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions:
                raise ValueError(f"history[{name!r}] at step {step} has dead_fraction {fractions!r}; expected a list")
            for value in fractions:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise ValueError(f"history[{name!r}] at step {step} has dead fraction {value!r}; expected 0..1")
            if layers is not None and len(fractions) != layers:
                raise ValueError(
                    f"history[{name!r}] has {layers} layers at one step and {len(fractions)} at step {step}"
                )
            layers = len(fractions)


def plot_dead_fraction(history: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Plot dead fraction per layer over training, one panel per activation; write a PNG atomically.

    ``history`` maps an activation name (e.g. "gelu", "relu", "helu") to its evaluations,
    ``[{"step": int, "dead_fraction": [per layer]}, ...]`` (``ActivationStats.history_entry``).
    """
    _check_history(history)
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    figure = Figure(figsize=(4.2 * len(history), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(history), sharey=True, squeeze=False)[0]
    top = max(max(p["dead_fraction"]) for points in history.values() for p in points)
    for ax, (name, points) in zip(axes, history.items(), strict=True):
        points = sorted(points, key=lambda point: point["step"])
        steps = [point["step"] for point in points]
        layers = len(points[0]["dead_fraction"])
        colors = colormaps["viridis"]
        for layer in range(layers):
            values = [100 * point["dead_fraction"][layer] for point in points]
            ax.plot(
                steps,
                values,
                marker="o",
                markersize=3,
                color=colors(layer / max(layers - 1, 1)),
                label=f"layer {layer}",
            )
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylim(0, max(1.0, 105 * top))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dead FFN units (%)")
    axes[-1].legend(fontsize="small", loc="best")
    figure.suptitle("FFN units that never fire, per layer")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# -- CLI: hf-helu inspect-activations ------------------------------------------------------------


def _glue_task_of(folder: Path):
    """The GLUE task whose folder name (``STS-B``) or task name (``stsb``) ``folder`` carries."""
    from hf_helu import glue

    for task in glue.GLUE_TASKS.values():
        if folder.name.lower() in (task.folder.lower(), task.name):
            return task
    raise ValueError(
        f"cannot tell which columns of {folder} hold text: its folder name is no GLUE task folder "
        f"(expected one of {', '.join(t.folder for t in glue.GLUE_TASKS.values())})"
    )


def read_texts(path: str | os.PathLike) -> list[tuple[str, str | None]]:
    """Texts (single or pairs) of a GLUE task folder (its dev set) or TSV file, or of a plain text file."""
    from hf_helu import glue

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data file at {path}")
    if path.is_dir() or path.suffix.lower() == ".tsv":
        task = _glue_task_of(path if path.is_dir() else path.parent)
        if path.is_dir():
            candidates = [path / name for name in task.eval_files().values()]
            path = next((c for c in candidates if c.is_file()), candidates[0])
            if not path.is_file():
                raise FileNotFoundError(f"no data file at {path}")
        columns = glue.read_tsv(task, path)
        first = columns[task.text_columns[0]]
        second = columns[task.text_columns[1]] if len(task.text_columns) > 1 else [None] * len(first)
        return list(zip(first, second, strict=True))
    texts = [(line.strip(), None) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} has no non-empty lines")
    return texts


def iter_text_batches(
    tokenizer: Any, texts: Sequence[tuple[str, str | None]], batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches (padded to the longest in the batch, truncated to ``max_length``)."""
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        first = [a for a, _ in chunk]
        second = [b for _, b in chunk] if chunk[0][1] is not None else None
        yield tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_inspect_activations_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-helu inspect-activations`` (an entry of ``hf_helu.cli.COMMANDS``)."""
    parser.add_argument("model", help="checkpoint folder or hub id, with its tokenizer")
    parser.add_argument(
        "--data", required=True, help="GLUE task folder (reads dev.tsv) or .tsv file, or a text file (one text a line)"
    )
    parser.add_argument("--max-samples", type=_positive_int, default=512, help="use the first N texts (default 512)")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--max-length", type=_positive_int, default=128, help="truncate to this many tokens")
    parser.add_argument("--scope", choices=("ffn", "all"), default="ffn", help="FFN activations only, or all")
    parser.add_argument(
        "--alpha", type=float, default=None, help="report the band (-alpha, 0] for every activation, not only HeLU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the statistics to this JSON file")


def run_inspect_activations(args: argparse.Namespace) -> int:
    """``hf-helu inspect-activations``: print the per-layer table of a checkpoint on a dataset."""
    from transformers import AutoTokenizer

    from hf_helu.cli import CLIError, load_model, resolve_source

    if args.alpha is not None:
        try:
            validate_alpha(args.alpha)
        except ValueError as error:
            raise CLIError(str(error)) from None
    try:
        texts = read_texts(args.data)[: args.max_samples]
    except (OSError, ValueError) as error:
        raise CLIError(str(error)) from None
    folder = resolve_source(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise CLIError(f"cannot load a tokenizer from {args.model!r} (text models only): {error}") from None
    model = load_model(folder).to(args.device).eval()
    if model.device.type == "cpu":
        model.float()
    with ActivationMonitor(model, scope=args.scope, alpha=args.alpha) as monitor, torch.inference_mode():
        for batch in iter_text_batches(tokenizer, texts, args.batch_size, args.max_length):
            model(**batch.to(args.device))
    stats = monitor.stats()
    print(f"{args.model} ({type(model).__name__}) on {len(texts)} texts of {args.data}")
    print(stats.table())
    if args.json_path:
        atomic_write_json(args.json_path, {"model": str(args.model), "data": str(args.data), **stats.to_dict()})
        print(f"wrote {args.json_path}")
    return 0
