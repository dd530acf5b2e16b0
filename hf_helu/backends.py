"""Kernels behind HeLU's autograd node, chosen per input by one lookup.

Each backend is a pair ``forward(x, alpha) -> (relu(x), mask)`` and
``backward(grad, mask, shape) -> grad_in``. The mask records ``not (x <= threshold)`` with
``threshold = -alpha`` rounded to x's dtype: the elements whose gradient passes (written that way
round so that a NaN input passes its gradient, as ReLU's does). Every backend gives the same
bits: ``y`` is ``torch.relu(x)`` and ``grad_in`` is ``grad`` where the mask is set, else +0.0,
exactly what ReLU's backward gives when alpha = 0.

- ``"triton"``: CUDA, float16/bfloat16/float32; one fused pass each way, bit-packed mask
  (:mod:`hf_helu.triton_kernels`).
- ``"c"``: CPU, all float dtypes; one fused pass each way, bit-packed mask, compiled on first use
  with the system C compiler (:mod:`hf_helu.cpu_kernels`).
- ``"numpy"``: CPU, float16/32/64, bit-packed mask; the fallback when no C compiler is found
  (NumPy's comparison is several times faster than PyTorch's on CPU).
- ``"torch"``: portable (any device, dtype, and inside ``torch.compile``); a bool mask.

``"auto"`` takes the first of those that supports the input. ``HF_HELU_BACKEND`` (or the
``backend`` argument of :func:`hf_helu.helu`) forces one.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch

from hf_helu import cpu_kernels

ENV_VAR = "HF_HELU_BACKEND"
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SAME_SIZE_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


_thresholds: dict[tuple[float, torch.dtype], float] = {}


def threshold(alpha: float, dtype: torch.dtype) -> float:
    """``-alpha`` rounded to ``dtype``: every backend compares the input with this same value."""
    if torch.compiler.is_compiling():  # traced as a constant; a cache would be a side effect
        return torch.tensor(-alpha, dtype=dtype).item()
    value = _thresholds.get((alpha, dtype))
    if value is None:
        value = _thresholds[(alpha, dtype)] = torch.tensor(-alpha, dtype=dtype).item()
    return value


# --- torch: the portable reference path -------------------------------------------------------


def _torch_forward(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.le(x, threshold(alpha, x.dtype)).logical_not_()
    return torch.relu(x), keep


def _torch_backward(grad: torch.Tensor, keep: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if grad.device.type == "cpu" and not torch.compiler.is_compiling():
        # torch.where is ~10x slower than a multiply on CPU; AND-ing the bits with an all-ones or
        # all-zeros word per element selects exactly as fast.
        ints = _SAME_SIZE_INT[grad.dtype]
        return (grad.view(ints) & keep.view(torch.int8).neg().to(ints)).view(grad.dtype)
    return torch.where(keep, grad, 0)


# --- numpy: CPU path with a bit-packed mask, no compiler needed --------------------------------


def _numpy_forward(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    values = x.detach().contiguous().numpy()
    dead = np.less_equal(values, values.dtype.type(threshold(alpha, x.dtype)))
    bits = np.packbits(dead, axis=None, bitorder="little")
    return torch.relu(x), torch.from_numpy(np.invert(bits, out=bits))


def _numpy_backward(grad: torch.Tensor, bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    keep = np.unpackbits(bits.numpy(), count=shape.numel(), bitorder="little")
    select = np.negative(keep.view(np.int8)).reshape(shape)  # 0 or -1 (every bit set)
    out = torch.empty(shape, dtype=grad.dtype)
    ints = _SAME_SIZE_INT[grad.dtype]
    np.bitwise_and(grad.contiguous().view(ints).numpy(), select, out=out.view(ints).numpy())
    return out


def _numpy_supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES


# --- c: fused CPU kernels ---------------------------------------------------------------------


def _c_forward(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return cpu_kernels.helu_forward(x, threshold(alpha, x.dtype))


def _c_supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in cpu_kernels.DTYPES and cpu_kernels.available()


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
    return x.is_cuda and x.dtype in _TRITON_DTYPES and triton_available()


Forward = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[[torch.Tensor, torch.Tensor, torch.Size], torch.Tensor]

BACKENDS: dict[str, tuple[Forward, Backward, Callable[[torch.Tensor], bool]]] = {
    "torch": (_torch_forward, _torch_backward, lambda x: True),
    "numpy": (_numpy_forward, _numpy_backward, _numpy_supports),
    "c": (_c_forward, cpu_kernels.helu_backward, _c_supports),
    "triton": (_triton_forward, _triton_backward, _triton_supports),
}
AUTO_ORDER = ("triton", "c", "numpy", "torch")


def check_name(name: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown HeLU backend {name!r}: expected one of {['auto', *BACKENDS]}")
    return name


def _why_unsupported(name: str, x: torch.Tensor) -> str:
    reason = f"HeLU backend {name!r} does not support a {x.dtype} tensor on {x.device}"
    if name == "c" and x.device.type == "cpu" and x.dtype in cpu_kernels.DTYPES:
        try:
            cpu_kernels.load()
        except RuntimeError as error:
            reason += f" ({error})"
    if name == "triton" and x.is_cuda and x.dtype in _TRITON_DTYPES:
        reason += " (Triton is not importable)"
    return reason + "; use 'auto' or 'torch'"


def resolve(x: torch.Tensor, requested: str | None = None) -> str:
    """Name of the backend that will run ``x``: the requested one, else the fastest that supports it."""
    name = check_name(requested or os.environ.get(ENV_VAR) or "auto")
    if torch.compiler.is_compiling():
        return "torch"  # plain torch ops trace into the graph (no break) and Inductor fuses them
    if name == "auto":
        return next(n for n in AUTO_ORDER if BACKENDS[n][2](x))
    if not BACKENDS[name][2](x):
        raise ValueError(_why_unsupported(name, x))
    return name


def forward(name: str, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS[name][0](x, alpha)


def backward(name: str, grad: torch.Tensor, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return BACKENDS[name][1](grad, mask, shape)
