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

import contextlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_helu.activation import validate_alpha
from hf_helu.capture import ForwardCapture, token_mask
from hf_helu.diagnostics.stats import ActivationStats
from hf_helu.diagnostics.tally import NUM_COUNTS, LayerTally, module_alpha, tensor_layout
from hf_helu.families import Scope, find_activation_sites, supported_families

Sites = Mapping[str, nn.Module] | Sequence[Any]


def _sites_of(model: nn.Module | None, scope: Scope) -> list[tuple[str, nn.Module, int | None]]:
    if model is None:
        raise ValueError("ActivationMonitor needs a model, explicit sites, or both; got neither")
    resolved = [(site.name, site.module, site.layer_index) for site in find_activation_sites(model, scope=scope)]
    if not resolved:
        raise ValueError(
            f"no activation found in {type(model).__name__} for scope={scope!r} (supported families: "
            f"{', '.join(supported_families())}, plus FFN blocks named like mlp/ffn/intermediate); "
            "pass sites={name: module} to monitor modules explicitly"
        )
    return resolved


def _given_sites(sites: Sites) -> list[tuple[str, nn.Module, int | None]]:
    if isinstance(sites, Mapping):
        return [(name, module, None) for name, module in sites.items()]
    if not isinstance(sites, Sequence) or isinstance(sites, str):
        raise TypeError(
            f"sites must be a mapping name -> module or a sequence of ActivationSite, got {type(sites).__name__}"
        )
    resolved = []
    for site in sites:
        if not all(hasattr(site, attr) for attr in ("name", "module")):
            raise TypeError(
                f"sites must be a mapping name -> module or a sequence of ActivationSite; got an item {site!r}"
            )
        resolved.append((site.name, site.module, getattr(site, "layer_index", None)))
    return resolved


def _resolve_sites(
    model: nn.Module | None, sites: Sites | None, scope: Scope
) -> list[tuple[str, nn.Module, int | None]]:
    """``(name, module, layer_index)`` of every activation to monitor: found in ``model``, or given as ``sites``."""
    resolved = _sites_of(model, scope) if sites is None else _given_sites(sites)
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
        sites: Sites | None = None,
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
        self._tallies = [
            LayerTally(
                name, module, layer_index, module_alpha(module, alpha), *tensor_layout(model, qualified.get(id(module)))
            )
            for name, module, layer_index in _resolve_sites(model, sites, scope)
        ]
        self.capture_attention_mask = capture_attention_mask and model is not None
        self.token_mask: torch.Tensor | None = None
        self._captured_mask: torch.Tensor | None = None
        self._frame_masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._capture: ForwardCapture | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []  # the model's mask capture pair
        self._forward_signature = None

    @property
    def names(self) -> list[str]:
        return [tally.name for tally in self._tallies]

    @property
    def attached(self) -> bool:
        return self._capture is not None or bool(self._handles)

    # -- hooks ----------------------------------------------------------------------------------

    def attach(self) -> ActivationMonitor:
        """Register the hooks (counters keep accumulating across attach/detach until ``reset()``)."""
        if self.attached:
            raise RuntimeError("ActivationMonitor is already attached; detach() it first")
        try:
            modules = {tally: tally.module for tally in self._tallies}
            self._capture = ForwardCapture(modules, record=None, on_call=self._on_call)
            if self.capture_attention_mask:
                self._handles.append(self.model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
                self._handles.append(self.model.register_forward_hook(self._release_mask, always_call=True))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook this monitor registered (and forget ``token_mask``). Safe to call twice."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        while self._handles:
            self._handles.pop().remove()
        self.token_mask = None
        self._captured_mask = None
        self._frame_masks.clear()

    def reset(self) -> None:
        """Forget everything counted so far (e.g. at the start of each evaluation)."""
        for tally in self._tallies:
            tally.reset()

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

    def _on_call(self, tally: LayerTally, args: tuple, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"activation {tally.name!r} returned {type(output).__name__}; expected a tensor")
        with torch.no_grad():
            inputs, output = tally.channels_last(args[0] if args else None, output.detach())
            tally.start(output)
            mask, unmasked = self._mask_for(tally, output.shape[:-1], output.device)
            tally.count(inputs, output, mask, unmasked)

    # -- padding masks --------------------------------------------------------------------------

    def _mask_for(
        self, tally: LayerTally, positions: torch.Size, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """The bool mask over ``positions`` for this call, and whether a mask was wanted but not found."""
        if self.token_mask is not None:
            mask = token_mask(self.token_mask, positions, device)
            if mask is None:
                raise ValueError(
                    f"monitor.token_mask has shape {tuple(self.token_mask.shape)} but activation {tally.name!r} "
                    f"has positions of shape {tuple(positions)} (its output shape without the units dim); "
                    "set token_mask to a mask with one entry per position, or to None"
                )
            return mask, False
        captured = self._captured_mask
        if captured is None:
            return None, False
        mask = token_mask(captured, positions, device)
        if mask is None:
            mask = self._frame_mask(tally, captured, positions, device)
            return mask, mask is None
        return mask, False

    def _frame_mask(
        self, tally: LayerTally, mask: torch.Tensor, positions: torch.Size, device: torch.device
    ) -> torch.Tensor | None:
        """A speech model's sample mask turned into the frames of ``tally``'s activation (None if not possible)."""
        to_frames: Callable | None = getattr(self.model, "_get_feature_vector_attention_mask", None)
        if to_frames is None or mask.dim() != 2 or len(positions) != 2 or mask.shape[0] != positions[0]:
            return None
        frames = int(positions[1])
        key = (tally.conv_depth or 0, frames, device)
        if key not in self._frame_masks:
            if tally.conv_depth is None:
                frame_mask = to_frames(frames, mask)
            else:
                frame_mask = self._conv_frames(tally.conv_depth, frames, mask)
            self._frame_masks[key] = frame_mask.to(device=device, dtype=torch.bool)
        return self._frame_masks[key]

    def _conv_frames(self, depth: int, frames: int, mask: torch.Tensor) -> torch.Tensor:
        """Frame mask after the first ``depth`` feature-encoder conv layers (no padding in those convs)."""
        config = self.model.config
        lengths = mask.sum(-1)
        for kernel, stride in zip(config.conv_kernel[:depth], config.conv_stride[:depth], strict=True):
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        return torch.arange(frames, device=mask.device)[None, :] < lengths[:, None]

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
        widths = self._global_widths(reduce, device)
        parts = [tally.packed(width, device) for tally, width in zip(self._tallies, widths, strict=True)]
        flat = reduce(torch.cat(parts)).cpu()
        layers, offset = [], 0
        for tally, width in zip(self._tallies, widths, strict=True):
            layers.append(tally.layer_stats(flat[offset : offset + NUM_COUNTS + width], width))
            offset += NUM_COUNTS + width
        return ActivationStats(tuple(layers))

    def _global_widths(self, reduce: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> list[int]:
        """Units of each activation; every process that saw it must agree, one that saw none contributes zeros."""
        units = torch.tensor([tally.units for tally in self._tallies], device=device)
        seen = (units > 0).to(torch.int64)
        totals = reduce(torch.stack([units * seen, seen]))
        widths = []
        for tally, local, (total, count) in zip(self._tallies, units.tolist(), totals.T.tolist(), strict=True):
            if count == 0:
                raise ValueError(
                    f"activation {tally.name!r} was never called since attach()/reset(): run forward passes "
                    "with the monitor attached before asking for stats"
                )
            width = total // count
            if total % count or (local and local != width):
                raise ValueError(f"activation {tally.name!r} has different widths on different processes")
            widths.append(width)
        return widths

    def _device(self) -> torch.device:
        for tally in self._tallies:
            if tally.counts is not None:
                return tally.counts.device
        for tally in self._tallies:
            for tensor in tally.module.parameters():
                return tensor.device
        if self.model is not None:
            for tensor in self.model.parameters():
                return tensor.device
        return torch.device("cpu")


def _reducer(accelerator: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum of a tensor over all processes: via ``accelerator``, else ``torch.distributed``, else the tensor itself."""
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
