"""An activation-sparsity term for a training loss: pushes FFN activations to exact zeros, for sparse decoding.

Batch-1 decoding reads, per token, the weight rows of the FFN units that fire; every unit at exactly 0 is rows not
read (:func:`hf_helu.sparse_inference`). A ReLU/HeLU model converted from SiLU leaves about 64% of its FFN
activations at zero; ProSparse (Song et al., 2024) reaches about 88% by adding an L1 penalty on the activation
outputs to the loss, its weight raised progressively. :class:`ActivationSparsityPenalty` is that term for any loop::

    penalty = hf_helu.ActivationSparsityPenalty(model, weight=0.1, warmup_steps=100)
    for batch in loader:
        loss = model(**batch).loss + penalty.loss()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        penalty.step()
    penalty.remove()

It only adds to the loss: the model's forward, its saved weights and its export are those of the plain model.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_helu.capture import ForwardCapture, token_mask
from hf_helu.errors import UsageError
from hf_helu.families import ActivationSite, Scope, find_activation_sites, unwrap_model


def check_penalty_weight(weight: object, name: str = "weight") -> float:
    """``weight`` as a float if it is a finite number >= 0, else a UsageError naming it."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise UsageError(f"{name} must be a finite number >= 0, got {weight!r} of type {type(weight).__name__}")
    value = float(weight)
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"{name} must be a finite number >= 0, got {weight!r}")
    return value


class ActivationSparsityPenalty:
    """``weight(step) * mean_layers(mean_{tokens, units} max(y, 0))`` over the FFN activation outputs ``y``.

    **What it measures.** Forward hooks on the FFN activation sites (:func:`hf_helu.find_activation_sites`; in a
    gated FFN, ``down(act(gate) * up)``, the site is ``act(gate)``, whose zeros let a sparse kernel skip a unit's
    up and down rows) record, for every call made with gradients enabled, the L1 norm of the output's positive
    part divided by its (tokens x units): one number per layer call, whatever the width, batch or sequence length,
    so a weight means the same on every model and batch shape. :meth:`loss` averages these over the calls since
    the last :meth:`loss` (layers weigh equally: each layer's zeros save the same share of its rows).

    * **Positive part**: for ReLU and HeLU the output is its own positive part; ``max(y, 0)`` has gradient 0 where
      ``y == 0``, so a unit already off is not pushed further. With HeLU this matters: a unit in the band
      ``(-alpha, 0]`` gets no push past ``-alpha`` from the penalty, only the language-model gradient that can
      bring it back. A plain activation (SiLU) is penalised on its positive outputs only.
    * **Padding**: the model's ``attention_mask`` (keyword or positional) is read by a pre-hook; where it has one
      entry per position of an activation, padded positions neither count nor get a gradient (padding is not
      decoded, its zeros buy nothing). ``attention_mask`` that does not match an activation's positions is ignored
      for that call.
    * **Schedule** (a smooth ramp, as in ProSparse's progressive regularisation): step ``t`` (0-based,
      :attr:`completed_steps`) uses ``weight * sin(pi/2 * min(1, (t + 1) / warmup_steps))``; ``warmup_steps=0`` is
      the full weight at once. Call :meth:`step` after each optimizer step (or set ``completed_steps`` when
      resuming).
    * ``weight == 0`` registers no hook at all and :meth:`loss` returns a constant 0: the run is the run without
      the penalty, bit for bit.

    ``model`` alone uses its FFN sites (``scope`` as in :func:`~hf_helu.find_activation_sites`); ``sites`` (a
    mapping name -> module, or ActivationSite objects) names the activation modules instead, for a model the site
    discovery does not know. Hooks are removed by :meth:`remove` or at the end of a ``with`` block. The terms of
    one forward are kept until :meth:`loss` (their graph included): call it once per forward, before backward.
    Gradient checkpointing recomputes activations during backward; those calls are recorded too and would count
    in the next :meth:`loss`, so do not combine the two.
    """

    def __init__(
        self,
        model: nn.Module,
        weight: float,
        *,
        warmup_steps: int = 0,
        sites: Mapping[str, nn.Module] | Sequence[ActivationSite] | None = None,
        scope: Scope = "ffn",
    ):
        if not isinstance(model, nn.Module):
            raise UsageError(f"model must be an nn.Module, got {type(model).__name__}")
        self.weight = check_penalty_weight(weight)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise UsageError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.completed_steps = 0
        self.model = model
        self._terms: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None
        self._signature: inspect.Signature | None = None
        self._capture: ForwardCapture | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.names: list[str] = []
        if self.weight == 0:
            return
        modules = _modules(model, sites, scope)
        self.names = list(modules)
        try:
            self._capture = ForwardCapture(modules, record=None, on_call=self._record)
            inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            self._handles.append(inner.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
            self._handles.append(inner.register_forward_hook(self._release_mask, always_call=True))
        except BaseException:
            self.remove()
            raise

    @property
    def enabled(self) -> bool:
        """True while hooks are attached (a non-zero weight, not removed)."""
        return self._capture is not None

    @property
    def current_weight(self) -> float:
        """The weight the schedule gives the current step."""
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * math.sin(0.5 * math.pi * min(1.0, (self.completed_steps + 1) / self.warmup_steps))

    def loss(self) -> torch.Tensor:
        """The weighted term of the forward passes since the last call (a 0-dim tensor; 0 when nothing ran)."""
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros((), device=_device(self.model))
        return self.current_weight * torch.stack(terms).mean()

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.completed_steps += 1

    def clear(self) -> None:
        """Drop the terms recorded since the last :meth:`loss` (e.g. after an evaluation run with gradients on)."""
        self._terms = []

    def remove(self) -> None:
        """Detach every hook (idempotent); the model is then exactly as before."""
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        while self._handles:
            self._handles.pop().remove()
        self._terms, self._mask = [], None

    def state_dict(self) -> dict[str, Any]:
        return {"completed_steps": self.completed_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.completed_steps = int(state["completed_steps"])

    def __enter__(self) -> ActivationSparsityPenalty:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- hooks ----------------------------------------------------------------------------------

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            if self._signature is None:
                self._signature = inspect.signature(module.forward)
            with contextlib.suppress(TypeError):
                mask = self._signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) else None

    def _release_mask(self, *unused) -> None:
        self._mask = None

    def _record(self, name: str, args: tuple, output: Any) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation: nothing to train
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"activation {name!r} returned {type(output).__name__}; expected a tensor")
        positive = torch.relu(output.float())  # not clamp_min: its gradient passes at 0, relu's does not
        mask = token_mask(self._mask, positive.shape[:-1], positive.device)
        if mask is None:
            self._terms.append(positive.mean())
            return
        total = (positive * mask.unsqueeze(-1)).sum()
        # no host sync: a call whose every position is padding adds a 0 term
        self._terms.append(total / (mask.sum().clamp_min(1) * positive.shape[-1]))


def _modules(
    model: nn.Module, sites: Mapping[str, nn.Module] | Sequence[ActivationSite] | None, scope: Scope
) -> dict[str, nn.Module]:
    """``{name: activation module}`` to hook: ``sites`` as given, or the sites of ``model`` in ``scope``."""
    if sites is None:
        found = find_activation_sites(unwrap_model(model), scope)
        if not found:
            raise UsageError(
                f"no FFN activation found in {type(model).__name__} (scope={scope!r}); pass sites={{name: module}}"
            )
        modules = {site.name: site.module for site in found}
    elif isinstance(sites, Mapping):
        modules = dict(sites)
    else:
        modules = {site.name: site.module for site in sites}
    if not modules:
        raise UsageError("sites is empty: no activation to penalise")
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise UsageError(f"activation {name!r} must be an nn.Module to be hooked, got {type(module).__name__}")
    return modules


def _device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


__all__ = ["ActivationSparsityPenalty", "check_penalty_weight"]
