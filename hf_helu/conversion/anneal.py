"""Annealing during fine-tuning: each FFN activation blends from the original into HeLU over the first steps.

Every FFN activation becomes ``(1 - l) act(z) + l helu(z)`` with ``l`` rising linearly from 0 to 1 over a
fraction of the steps (a forward hook on each HeLU module); at ``l == 1`` the hook is removed and the module
is the HeLU itself again.
"""

from __future__ import annotations

import functools
import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from hf_helu.activation import HeLU
from hf_helu.conversion.sites import ActivationFunction, ActivationSpec, ffn_sites, reference_functions
from hf_helu.families import ActivationSite, unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_ANNEAL_FRACTION = 0.5
ANNEAL_MODES = ("blend", "gradient")


class ActivationAnnealer:
    """Blends each FFN activation from the original into the model's HeLU over the first steps.

    ``model`` is already patched (HeLU in its FFN blocks); ``original`` is what they were (see
    :func:`original_activations`). ``l`` goes 0 -> 1 linearly over ``round(anneal_fraction *
    total_steps)`` optimizer steps; a forward hook on each HeLU module applies it:

    * ``mode="blend"``: the output becomes ``(1 - l) * original(z) + l * helu(z)``, forward and
      backward (for a model whose weights were trained for the original activation).
    * ``mode="gradient"``: the forward stays ReLU (up to rounding) and only the gradient is blended,
      ``(1 - l) * original'(z) + l * helu'(z)`` (for a *calibrated* model, whose output projections
      were refitted for ReLU inputs: blending GELU back into its forward would undo the fit).

    When ``l`` reaches 1 the hooks are removed: the model is then exactly the patched HeLU model
    (ReLU forward, bit for bit). The modules themselves are never replaced, so optimizers, PEFT,
    monitors and exports see the same model throughout.

    Drive it with :meth:`step` (one call per optimizer step) or :meth:`on_step` (the absolute step,
    resume-safe); it also has ``state_dict`` / ``load_state_dict`` for
    ``accelerator.register_for_checkpointing``. With the HF Trainer, use :meth:`callback`.
    """

    def __init__(
        self,
        model: nn.Module,
        original: ActivationSpec | Mapping[str, ActivationSpec],
        total_steps: int | None = None,
        anneal_fraction: float = DEFAULT_ANNEAL_FRACTION,
        sites: Sequence[ActivationSite] | None = None,
        mode: str = "blend",
    ):
        if mode not in ANNEAL_MODES:
            raise ValueError(f"annealing mode must be one of {ANNEAL_MODES}, got {mode!r}")
        self.mode = mode
        if (
            isinstance(anneal_fraction, bool)
            or not isinstance(anneal_fraction, numbers.Real)
            or not 0 < anneal_fraction <= 1
        ):
            raise ValueError(f"anneal_fraction must be a number in (0, 1], got {anneal_fraction!r}")
        self.anneal_fraction = float(anneal_fraction)
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.current_step = 0
        inner = unwrap_model(model)
        sites = ffn_sites(inner) if sites is None else list(sites)
        originals = reference_functions(original, sites)
        self._mix = {torch.device("cpu"): torch.zeros(())}
        self._handles = []
        for site in sites:
            module = inner.get_submodule(site.name)
            if not isinstance(module, HeLU | nn.ReLU):
                raise TypeError(
                    f"{site.name} is a {type(module).__name__}, not HeLU/ReLU: patch the model before annealing"
                )
            self._handles.append(module.register_forward_hook(self._blend_hook(originals[site.name])))

    def _blend_hook(self, original: ActivationFunction):
        def blend(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            mix = self._mix_on(output.device)
            return (1 - mix) * original(args[0]) + mix * output

        def blend_gradient(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                return output
            mix = self._mix_on(output.device)
            smooth = original(args[0])
            # Forward: l*r + (1-l)*g + (1-l)*(r - g) = r. Backward: l*helu'(z) + (1-l)*original'(z).
            return mix * output + (1 - mix) * smooth + ((1 - mix) * (output - smooth)).detach()

        return blend if self.mode == "blend" else blend_gradient

    def _mix_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._mix:
            self._mix[device] = self._mix[torch.device("cpu")].to(device)
        return self._mix[device]

    def set_total_steps(self, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.total_steps = int(total_steps)

    @property
    def anneal_steps(self) -> int:
        """Optimizer steps from the original activation (l = 0) to pure HeLU (l = 1)."""
        if self.total_steps is None:
            raise RuntimeError("ActivationAnnealer has no total_steps yet: call set_total_steps(n) first")
        return max(1, round(self.anneal_fraction * self.total_steps))

    @property
    def mix(self) -> float:
        """Current weight of HeLU in the blend (0 = original activation, 1 = pure HeLU)."""
        if self.current_step == 0:
            return 0.0
        return min(1.0, self.current_step / self.anneal_steps)

    @property
    def finished(self) -> bool:
        """True once the blend hooks are gone and the model is pure HeLU."""
        return not self._handles

    def step(self) -> float:
        """Advance one optimizer step; returns the new mix. Removes the blend when it reaches 1."""
        self.current_step += 1
        self._apply()
        return self.mix

    def on_step(self, completed_steps: int, total_steps: int | None = None) -> None:
        """Set the absolute optimizer step (and the run's total if not yet known): for training loops."""
        if self.total_steps is None and total_steps is not None:
            self.set_total_steps(total_steps)
        self.current_step = int(completed_steps)
        self._apply()

    def _apply(self) -> None:
        if self.finished:
            return
        mix = self.mix
        for tensor in self._mix.values():
            tensor.fill_(mix)
        if mix >= 1.0:
            self.finish()

    def finish(self) -> None:
        """Remove the blend (idempotent): the model is pure HeLU from here on. Call before saving."""
        if not self.finished and self.mix < 1.0:
            logger.warning("annealing stopped at mix %.3f < 1: switching to pure HeLU now", self.mix)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_step": self.current_step,
            "total_steps": self.total_steps,
            "anneal_fraction": self.anneal_fraction,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"annealer state is for mode {state['mode']!r}, this annealer is {self.mode!r}")
        self.anneal_fraction = float(state["anneal_fraction"])
        if state["total_steps"] is not None:
            self.set_total_steps(state["total_steps"])
        self.current_step = int(state["current_step"])
        self._apply()

    def callback(self):
        """A ``transformers.TrainerCallback`` that drives this annealer from the HF Trainer."""
        return _annealing_callback_class()(self)


@functools.cache
def _annealing_callback_class() -> type:
    """Built on first use: importing ``transformers.TrainerCallback`` pulls in the Trainer's dependencies."""
    from transformers import TrainerCallback

    class AnnealingCallback(TrainerCallback):
        """HF Trainer callback: the Trainer's step count and total drive an :class:`ActivationAnnealer`."""

        def __init__(self, annealer: ActivationAnnealer):
            self.annealer = annealer

        def on_train_begin(self, args, state, control, **kwargs):
            self.annealer.on_step(state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            self.annealer.on_step(state.global_step, state.max_steps)

        def on_train_end(self, args, state, control, **kwargs):
            self.annealer.finish()

    AnnealingCallback.__module__ = __name__
    return AnnealingCallback


def __getattr__(name: str):
    if name == "AnnealingCallback":
        return _annealing_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
