"""Kernels behind HeLU's autograd node: a registry of backends, and one lookup that picks one per input.

Each :class:`Backend` has ``forward(x, threshold) -> (relu(x), mask)`` and
``backward(grad, mask, shape, memory_format) -> grad_in``. The mask records ``not (x <= threshold)`` with
``threshold = -alpha`` rounded to x's dtype (:func:`threshold`): the elements whose gradient passes
(written that way round so that a NaN input passes its gradient, as ReLU's does). Every backend gives
the same bits: ``y`` is ``torch.relu(x)`` and ``grad_in`` is ``grad`` where the mask is set, else
+0.0, exactly what ReLU's backward gives when alpha = 0.

- ``"triton"``: CUDA, float16/bfloat16/float32; one fused pass each way, bit-packed mask
  (:mod:`hf_helu.ops.triton_kernels`).
- ``"c"``: CPU, all float dtypes; one fused pass each way, bit-packed mask, compiled on first use
  with the system C compiler (:mod:`hf_helu.ops.cpu`, source in ``helu_cpu.c``).
- ``"torch"``: portable (any device, dtype, and inside ``torch.compile``); a bool mask
  (:mod:`hf_helu.ops.torch_ref`).

``"auto"`` takes the first of those (in that order) that supports the input. ``HF_HELU_BACKEND``
(or the ``backend`` argument of :func:`hf_helu.helu`) forces one; an unknown value of the variable is an
error at import. The torch backend runs inside ``torch.compile`` (Inductor fuses its ops), for a forward under
``torch.func.vmap`` (its bool mask carries a batch dimension; a packed one cannot) and for tensor subclasses such as
``FakeTensor`` (no memory for a kernel to read); every other case keeps the chosen one.
The fused backends keep a row-major or channels-last input's memory format (:mod:`hf_helu.ops.layout`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hf_helu.ops import cpu, layout, torch_ref

ENV_VAR = "HF_HELU_BACKEND"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

Forward = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
Backward = Callable[..., torch.Tensor]  # (grad, mask, shape[, memory_format]) -> grad_in


def _no_reason(x: torch.Tensor) -> str:
    return ""


@dataclass(frozen=True)
class Backend:
    """One kernel pair and the inputs it runs on.

    ``forward(x, threshold)`` gets the threshold already rounded to x's dtype; ``backward(grad, mask, shape[,
    memory_format])`` gets the shape and, when it is not row-major, the memory format of the forward's output.
    ``why_unsupported(x)`` adds detail (e.g. the compiler error) to the message raised when a forced backend
    cannot run ``x``. ``packed``: the mask is 8 bits per byte in the output's memory order (:func:`unpack`
    turns it into a bool tensor).
    """

    name: str
    forward: Forward
    backward: Backward
    supports: Callable[[torch.Tensor], bool]
    why_unsupported: Callable[[torch.Tensor], str] = _no_reason
    packed: bool = False


_thresholds: dict[tuple[float, torch.dtype], float] = {}


def threshold(alpha: float, dtype: torch.dtype) -> float:
    """``-alpha`` rounded to ``dtype``: every backend compares the input with this same value."""
    value = _thresholds.get((alpha, dtype))
    if value is None:
        value = _thresholds[(alpha, dtype)] = torch.tensor(-alpha, dtype=dtype).item()
    return value


# torch.compile bakes the value into the graph (no break at .item()): what torch.compiler.assume_constant_result
# sets, without the import of torch._dynamo (and triton) that the decorator costs every `import hf_helu`.
threshold._dynamo_marked_constant = True


def _plain(x: torch.Tensor) -> bool:
    """True for a tensor with real memory behind it: the fused kernels read raw pointers.

    A tensor subclass (``FakeTensor`` under ``torch.export``, compile tracing or meta-device tools,
    ``FunctionalTensor``, ``DTensor``) may have none, so it takes the torch backend.
    """
    return type(x) in (torch.Tensor, torch.nn.Parameter)


# --- c: fused CPU kernels ---------------------------------------------------------------------


def _c_supports(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in cpu.DTYPES and cpu.available()


def _c_why_unsupported(x: torch.Tensor) -> str:
    if x.device.type == "cpu" and x.dtype in cpu.DTYPES:
        return f" ({cpu.why_unavailable()})"
    return ""


# --- triton: fused CUDA kernels (imported on first use: triton is optional) --------------------


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


def _triton_forward(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_helu.ops import triton_kernels

    return triton_kernels.helu_forward(x, threshold)


def _triton_backward(
    grad: torch.Tensor,
    bits: torch.Tensor,
    shape: torch.Size,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    from hf_helu.ops import triton_kernels

    return triton_kernels.helu_backward(grad, bits, shape, memory_format)


def _triton_supports(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in _TRITON_DTYPES and triton_available()


def _triton_why_unsupported(x: torch.Tensor) -> str:
    return " (Triton is not importable)" if x.is_cuda and x.dtype in _TRITON_DTYPES else ""


# --- the registry and the dispatcher ----------------------------------------------------------

BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (  # in the order "auto" tries them
        Backend("triton", _triton_forward, _triton_backward, _triton_supports, _triton_why_unsupported, True),
        Backend("c", cpu.helu_forward, cpu.helu_backward, _c_supports, _c_why_unsupported, True),
        Backend("torch", torch_ref.helu_forward, torch_ref.helu_backward, lambda x: True),
    )
}


def check_name(name: str) -> str:
    """``name`` if it is ``"auto"`` or a backend, else a ValueError listing the choices."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown HeLU backend {name!r}: expected one of {['auto', *BACKENDS]}")
    return name


def check_env() -> str:
    """The backend ``HF_HELU_BACKEND`` asks for (``"auto"`` when unset), or a ValueError naming it and the choices.

    Called when hf_helu is imported and when a HeLU module is built, so a typo is reported before any work
    starts, also in a run that never trains (which would never reach :func:`resolve`).
    """
    value = os.environ.get(ENV_VAR) or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(
            f"environment variable {ENV_VAR}={value!r} is not a HeLU backend: expected one of "
            f"{['auto', *BACKENDS]}, or leave it unset"
        )
    return value


def resolve(x: torch.Tensor, requested: str | None = None) -> str:
    """Name of the backend that will run ``x``: the requested one, else the fastest that supports it."""
    name = check_name(requested) if requested else check_env()
    if torch.compiler.is_compiling() or not _plain(x):
        return "torch"  # plain torch ops trace into the graph (no break) and Inductor fuses them
    if name == "auto":
        return next(backend.name for backend in BACKENDS.values() if backend.supports(x))
    backend = BACKENDS[name]
    if not backend.supports(x):
        raise ValueError(
            f"HeLU backend {name!r} does not support a {x.dtype} tensor on {x.device}"
            f"{backend.why_unsupported(x)}; use 'auto' or 'torch'"
        )
    return name


def forward(name: str, x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), mask)`` from backend ``name``."""
    return BACKENDS[name].forward(x, threshold(alpha, x.dtype))


def backward(
    name: str,
    grad: torch.Tensor,
    mask: torch.Tensor,
    shape: torch.Size,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """The input gradient from backend ``name``: ``grad`` where ``mask`` is set, else +0.0.

    ``shape`` and ``memory_format`` are the forward output's (:func:`output_format`); the result has them.
    """
    if memory_format == torch.contiguous_format:  # the common case, and the 3-argument form of older backends
        return BACKENDS[name].backward(grad, mask, shape)
    return BACKENDS[name].backward(grad, mask, shape, memory_format)


def output_format(y: torch.Tensor) -> torch.memory_format:
    """The memory format a backend's forward output ``y`` is in, to hand back to :func:`backward`."""
    return layout.memory_format(y) or torch.contiguous_format


def unpack(
    name: str, mask: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """Backend ``name``'s mask as a bool tensor shaped like the forward's output (the torch backend's own form)."""
    if not BACKENDS[name].packed:
        return mask
    return layout.unpack_bits(mask, shape, memory_format)


check_env()
