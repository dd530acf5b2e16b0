"""Kernels behind HeLU's autograd node, chosen per input by one lookup.

Each backend is a pair ``forward(x, alpha) -> (relu(x), mask)`` and
``backward(grad, mask, shape) -> grad_in``. The mask records ``not (x <= -alpha)``: the elements whose
gradient passes. (Written that way round so that a NaN input passes its gradient, as ReLU's does.)

- ``"torch"``: portable (any device, dtype, layout, and inside ``torch.compile``); a bool mask.
- ``"numpy"``: CPU, contiguous float16/32/64; a bit-packed mask (1 bit per element). PyTorch's CPU
  comparison kernels are several times slower than NumPy's, which is what makes this path cheap.
- ``"triton"``: CUDA; one fused pass each way with a bit-packed mask (:mod:`hf_helu.triton_kernels`).

``HF_HELU_BACKEND`` (or the ``backend`` argument of :func:`hf_helu.helu`) forces one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch

ENV_VAR = "HF_HELU_BACKEND"
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)


def threshold(alpha: float, dtype: torch.dtype) -> float:
    """``-alpha`` rounded to ``dtype``: every backend compares the input with this same value."""
    return torch.tensor(-alpha, dtype=dtype).item()


# --- torch: the portable reference path -------------------------------------------------------


def _torch_forward(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.le(x, threshold(alpha, x.dtype)).logical_not_()
    return torch.relu(x), keep


def _torch_backward(grad: torch.Tensor, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Multiplying by the uint8 view is 3x faster on CPU than by the bool tensor itself.
    return grad * keep.view(torch.uint8)


# --- numpy: fast CPU path with a bit-packed mask ----------------------------------------------


def _numpy_forward(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    values = x.detach().numpy()
    dead = np.less_equal(values, np.asarray(threshold(alpha, x.dtype), dtype=values.dtype))
    bits = np.packbits(np.logical_not(dead, out=dead), axis=None, bitorder="little")
    return torch.relu(x), torch.from_numpy(bits)


def _numpy_backward(grad: torch.Tensor, bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    keep = np.unpackbits(bits.numpy(), count=shape.numel(), bitorder="little")
    return grad * torch.from_numpy(keep).view(shape)


def _numpy_supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and x.is_contiguous()


# --- triton: fused CUDA kernels ---------------------------------------------------------------


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_forward(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_helu import triton_kernels

    return triton_kernels.helu_forward(x, threshold(alpha, x.dtype))


def _triton_backward(grad: torch.Tensor, bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    from hf_helu import triton_kernels

    return triton_kernels.helu_backward(grad, bits, shape)


def _triton_supports(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_available()


Forward = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[[torch.Tensor, torch.Tensor, torch.Size], torch.Tensor]

BACKENDS: dict[str, tuple[Forward, Backward, Callable[[torch.Tensor], bool]]] = {
    "torch": (_torch_forward, _torch_backward, lambda x: True),
    "numpy": (_numpy_forward, _numpy_backward, _numpy_supports),
    "triton": (_triton_forward, _triton_backward, _triton_supports),
}
AUTO_ORDER = ("triton", "numpy", "torch")


def check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown HeLU backend {name!r}: expected one of {['auto', *BACKENDS]}")
    return name


def resolve(x: torch.Tensor, requested: str | None = None) -> str:
    """Name of the backend that will run ``x``: the requested one, else the fastest that supports it."""
    name = check_name(requested or os.environ.get(ENV_VAR, "auto") or "auto")
    if torch.compiler.is_compiling():
        return "torch"  # plain torch ops trace into the graph (no break) and Inductor fuses them
    if name == "auto":
        return next(n for n in AUTO_ORDER if BACKENDS[n][2](x))
    if not BACKENDS[name][2](x):
        raise ValueError(
            f"HeLU backend {name!r} does not support a {x.dtype} tensor on {x.device} "
            f"(contiguous={x.is_contiguous()}); use 'auto' or 'torch'"
        )
    return name


def forward(name: str, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS[name][0](x, alpha)


def backward(name: str, grad: torch.Tensor, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return BACKENDS[name][1](grad, mask, shape)
