"""The ``"torch"`` backend: HeLU from plain torch ops, the portable reference every other backend matches.

It runs on any device and dtype, and inside ``torch.compile`` (plain ops trace into the graph with no
break, and Inductor fuses them). Its mask is a bool tensor, 1 byte per element (the fused backends
pack 8 elements per byte).
"""

from __future__ import annotations

import torch

_SAME_SIZE_INT = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def helu_forward(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), keep)``: keep is a bool tensor holding ``not (x <= threshold)`` (True for NaN)."""
    keep = torch.le(x, threshold).logical_not_()
    return torch.relu(x), keep


def helu_backward(
    grad: torch.Tensor, keep: torch.Tensor, shape: torch.Size, memory_format: torch.memory_format | None = None
) -> torch.Tensor:
    """``grad`` where ``keep`` is set, else +0.0 (elementwise: ``shape`` and ``memory_format`` are not needed).

    ``grad`` and ``keep`` may differ in leading (batch) dimensions: they broadcast, as under ``torch.func.vmap``.
    """
    if grad.device.type == "cpu" and not torch.compiler.is_compiling():
        # torch.where is much slower than a multiply on CPU (BENCHMARKS.md); AND-ing the bits with an all-ones
        # or all-zeros word per element selects exactly, as fast as a multiply.
        ints = _SAME_SIZE_INT[grad.dtype]
        # The mask first: the result takes its memory format (the forward input's), as ReLU's backward does.
        return (keep.view(torch.int8).neg().to(ints) & grad.view(ints)).view(grad.dtype)
    return torch.where(keep, grad, 0)
