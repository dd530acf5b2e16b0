"""The ``"triton"`` backend: fused Triton kernels for CUDA, one memory pass each way, a 1-bit mask between.

    forward:   read x once; write y = relu(x) and bits, bit (i % 8) of byte i // 8 = not (x[i] <= threshold)
    backward:  read grad and bits once; write grad_in = grad where the bit is set, else +0.0

ReLU's backward reads its 2-byte (bf16) output; this one reads 1 bit, which is what lets HeLU run
at ReLU's speed with ReLU's memory plus n/8 bytes. Each program handles ``BLOCK_BYTES`` mask bytes,
i.e. ``8 * BLOCK_BYTES`` elements, as a ``[BLOCK_BYTES, 8]`` tile so that packing is a sum over
the last axis. The threshold comes in already rounded to x's dtype, so the comparison (made in
float32, exact for float16/bfloat16 values) agrees bit for bit with the torch reference
(:mod:`hf_helu.ops.torch_ref`).

The tests run these kernels on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_helu.ops import layout

BLOCK_BYTES = 256
NUM_WARPS = 4


@triton.jit
def _forward_kernel(x_ptr, y_ptr, bits_ptr, n, threshold, BLOCK_BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + lane[None, :]
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
    xf = x.to(tl.float32)  # exact for float16/bfloat16
    # torch.relu on CUDA is fmaxf(x, 0) in float32, with a NaN passed through unchanged.
    y = tl.where(xf != xf, x, tl.maximum(xf, 0.0).to(x.dtype))
    tl.store(y_ptr + offsets, y, mask=inside)
    # not (x <= t): True for NaN, whose gradient ReLU passes; padding bits past n stay 0.
    keep = ((xf <= threshold) == 0) & inside
    packed = tl.sum(keep.to(tl.int32) << lane[None, :], axis=1)
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte * 8 < n)


@triton.jit
def _backward_kernel(grad_ptr, bits_ptr, out_ptr, n, BLOCK_BYTES: tl.constexpr):
    byte = tl.program_id(0).to(tl.int64) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    lane = tl.arange(0, 8)
    offsets = byte[:, None] * 8 + lane[None, :]
    inside = offsets < n
    packed = tl.load(bits_ptr + byte, mask=byte * 8 < n, other=0).to(tl.int32)
    keep = ((packed[:, None] >> lane[None, :]) & 1) != 0
    grad = tl.load(grad_ptr + offsets, mask=inside, other=0.0)
    tl.store(out_ptr + offsets, tl.where(keep, grad, 0.0).to(out_ptr.dtype.element_ty), mask=inside)


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, 8 * BLOCK_BYTES),)


def helu_forward(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), bits)``: bits is uint8 of ``ceil(n / 8)`` bytes holding ``not (x <= threshold)``."""
    x = layout.dense(x.detach())
    n = x.numel()
    y = torch.empty_like(x)
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8, device=x.device)
    if n:
        _forward_kernel[_grid(n)](x, y, bits, n, threshold, BLOCK_BYTES=BLOCK_BYTES, num_warps=NUM_WARPS)
    return y, bits


def helu_backward(
    grad: torch.Tensor,
    bits: torch.Tensor,
    shape: torch.Size,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """``grad`` where the mask bit is set, else +0.0: shaped ``shape``, in the forward's ``memory_format``."""
    grad = grad.contiguous(memory_format=memory_format)
    out = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format)
    n = out.numel()
    if n:
        _backward_kernel[_grid(n)](grad, bits, out, n, BLOCK_BYTES=BLOCK_BYTES, num_warps=NUM_WARPS)
    return out
