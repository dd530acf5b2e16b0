"""HeLU, the hysteresis ReLU: ReLU's forward with the backward threshold moved from 0 to -alpha.

    forward:   y = relu(z)                 (bit-identical to torch.relu)
    backward:  dz = dy  where z > -alpha,  else 0

The backward needs to know where ``z > -alpha``, which ReLU's output cannot tell, so the autograd
node saves a mask (1 bit or 1 byte per element, from the kernels in :mod:`hf_helu.ops`) and never the
float input. Without autograd
(``torch.no_grad()``, an input that does not require grad, a module in eval mode) HeLU is plain
``torch.relu``: no node, no mask.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from hf_helu import ops

DEFAULT_ALPHA = 0.05
ACTIVATION_NAME = "helu"


def validate_alpha(alpha: object) -> float:
    """Return ``alpha`` as a float, or raise naming the bad value."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"HeLU alpha must be a real number >= 0, got {alpha!r} of type {type(alpha).__name__}")
    value = float(alpha)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"HeLU alpha must be a finite number >= 0, got {alpha!r}")
    if value < 0:
        raise ValueError(f"HeLU alpha must be >= 0 (the backward threshold is -alpha), got {alpha!r}")
    return value


def _check_input(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"helu expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"helu expects a floating-point tensor, got dtype {x.dtype}")
    return x


class HeLUFunction(torch.autograd.Function):
    """Autograd node of HeLU: saves only the backend's mask (never the float input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, backend: str) -> torch.Tensor:
        y, mask = ops.forward(backend, x, alpha)
        ctx.save_for_backward(mask)
        ctx.backend = backend
        ctx.input_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return ops.backward(ctx.backend, grad, mask, ctx.input_shape), None, None


def helu(x: torch.Tensor, alpha: float = DEFAULT_ALPHA, backend: str | None = None) -> torch.Tensor:
    """HeLU of ``x``: ``torch.relu(x)`` forward, gradient passed where ``x > -alpha``.

    ``backend`` forces a kernel ("triton", "c" or "torch"); by default ("auto", or ``HF_HELU_BACKEND``
    when set) the fastest one that supports the input is chosen (see :mod:`hf_helu.ops`).
    """
    alpha = validate_alpha(alpha)
    _check_input(x)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return torch.relu(x)
    return HeLUFunction.apply(x, alpha, ops.resolve(x, backend))


class HeLU(nn.Module):
    """HeLU as a module, the way ``transformers.activations`` builds ``ACT2FN["helu"]``.

    In eval mode it is exactly ``nn.ReLU`` (no mask is saved even if gradients flow).
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, backend: str | None = None):
        super().__init__()
        self.alpha = validate_alpha(alpha)
        if backend is not None:
            ops.check_name(backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.relu(_check_input(x))
        return helu(x, self.alpha, self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def activation_name(alpha: float = DEFAULT_ALPHA) -> str:
    """The ``hidden_act`` string for a HeLU with ``alpha``: ``"helu"`` or e.g. ``"helu_0.1"``."""
    alpha = validate_alpha(alpha)
    return ACTIVATION_NAME if alpha == DEFAULT_ALPHA else f"{ACTIVATION_NAME}_{alpha!r}"


def parse_activation_name(name: object) -> float | None:
    """Alpha encoded in an activation name (``"helu"`` -> 0.05, ``"helu_0.1"`` -> 0.1), else None.

    Raises ``ValueError`` for a HeLU name whose alpha is not a valid number (``"helu_abc"``).
    """
    if not isinstance(name, str):
        return None
    if name == ACTIVATION_NAME:
        return DEFAULT_ALPHA
    prefix = ACTIVATION_NAME + "_"
    if not name.startswith(prefix):
        return None
    text = name[len(prefix) :]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"activation name {name!r} is not a HeLU name: expected 'helu' or 'helu_<alpha>' such as 'helu_0.1'"
        ) from None
    return validate_alpha(value)
