"""The on-device counters of one monitored activation module, and how its tensors are laid out."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from hf_helu.activation import HeLU
from hf_helu.diagnostics.stats import LayerActivationStats
from hf_helu.ops import threshold

# Counter slots per activation, kept in one int64 tensor so the cross-process reduction is one call.
_TOKENS, _ZEROS, _BAND, _CALLS, _UNMASKED_CALLS, _NAN_CALLS = range(6)
NUM_COUNTS = 6

_FEATURE_ENCODER_LAYER = re.compile(r"(?:^|\.)conv_layers\.(\d+)\.[^.]+$")


def module_alpha(module: nn.Module, alpha: float | None) -> float | None:
    """The band's alpha for ``module``: ``alpha`` when given, else HeLU's own, else None (no band)."""
    if alpha is not None:
        return alpha
    return module.alpha if isinstance(module, HeLU) else None


def tensor_layout(model: nn.Module | None, name: str | None) -> tuple[bool, int | None]:
    """(channels_first, conv_depth) of the activation ``model.<name>``: channels-first when its parent block holds
    a convolution (its input is (batch, channels, time...)); conv_depth for layer i of a speech feature encoder."""
    if model is None or name is None:
        return False, None
    parent = model.get_submodule(name.rpartition(".")[0])
    channels_first = any(isinstance(child, nn.modules.conv._ConvNd) for child in parent.children())
    match = _FEATURE_ENCODER_LAYER.search(name)
    return channels_first, int(match.group(1)) + 1 if channels_first and match else None


class LayerTally:
    """One monitored activation module and its on-device counters (the per-run state of a monitor)."""

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
        self.counts: torch.Tensor | None = None  # int64 [NUM_COUNTS]

    @property
    def units(self) -> int:
        """Units seen so far (0 before the first call)."""
        return self.fired.numel() if self.fired is not None else 0

    def reset(self) -> None:
        self.fired = None
        self.counts = None

    def channels_last(self, inputs: Any, output: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Input and output with the units last; checks the input a band count needs."""
        if self.channels_first and output.dim() >= 3:  # (batch, channels, time...) -> channels last
            output = output.movedim(1, -1)
            inputs = inputs.movedim(1, -1) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 3 else inputs
        if self.alpha is not None and (not isinstance(inputs, torch.Tensor) or inputs.shape != output.shape):
            raise ValueError(
                f"activation {self.name!r}: the hysteresis band needs the activation input with the output's "
                f"shape {tuple(output.shape)}, got {type(inputs).__name__}"
                + (f" of shape {tuple(inputs.shape)}" if isinstance(inputs, torch.Tensor) else "")
            )
        return inputs, output

    def start(self, output: torch.Tensor) -> None:
        """Create the counters on the first call; check the width on later ones."""
        units = output.shape[-1]
        if self.fired is None:
            # Normal (not inference-mode) tensors, so they can be updated under any grad mode later.
            with torch.inference_mode(False):
                self.fired = torch.zeros(units, dtype=torch.bool, device=output.device)
                self.counts = torch.zeros(NUM_COUNTS, dtype=torch.int64, device=output.device)
        elif self.fired.numel() != units:
            raise ValueError(f"activation {self.name!r} had {self.fired.numel()} units before and now {units}")

    def count(self, inputs: Any, output: torch.Tensor, mask: torch.Tensor | None, unmasked: bool) -> None:
        """Add one call (units last; ``mask`` over its positions or None; ``unmasked``: a mask was wanted)."""
        units = output.shape[-1]
        # Few full passes over the output, all reductions (PyTorch's bool .sum() is slow on CPU, count_nonzero
        # is not). Padded rows are multiplied to 0: never > 0, and their zeros are subtracted again.
        flat = output.reshape(-1, units)
        counts = self.counts
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
        self.fired |= column_max > 0
        counts[_NAN_CALLS] += column_max.isnan().any()  # a NaN hides the column's maximum
        counts[_TOKENS] += kept
        counts[_ZEROS] += torch.count_nonzero(flat == 0) - padded_elements
        if self.alpha is not None:
            z = inputs.detach().reshape(-1, units)
            band = (z <= 0) & (z > threshold(self.alpha, z.dtype))  # HeLU's own (cached) threshold
            if mask is not None:
                band &= keep
            counts[_BAND] += torch.count_nonzero(band)

    def packed(self, width: int, device: torch.device) -> torch.Tensor:
        """Counters then fired flags as one int64 vector of ``NUM_COUNTS + width`` (zeros if never called)."""
        if self.fired is None:
            return torch.zeros(NUM_COUNTS + width, dtype=torch.int64, device=device)
        return torch.cat([self.counts.to(device), self.fired.to(device=device, dtype=torch.int64)])

    def layer_stats(self, packed: torch.Tensor, width: int) -> LayerActivationStats:
        """The statistics of a (reduced) :meth:`packed` vector."""
        counts = packed[:NUM_COUNTS].tolist()
        fired = packed[NUM_COUNTS : NUM_COUNTS + width]
        return LayerActivationStats(
            name=self.name,
            layer_index=self.layer_index,
            units=width,
            dead_units=int((fired == 0).sum()),
            dead_indices=tuple((fired == 0).nonzero().flatten().tolist()),
            tokens=counts[_TOKENS],
            zero_elements=counts[_ZEROS],
            band_elements=counts[_BAND] if self.alpha is not None else None,
            alpha=self.alpha,
            calls=counts[_CALLS],
            unmasked_calls=counts[_UNMASKED_CALLS],
            nan_calls=counts[_NAN_CALLS],
        )
