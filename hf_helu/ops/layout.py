"""Memory layouts for the fused kernels, which walk a tensor's memory as one flat array.

A kernel runs on ``x`` in place of a copy when ``x`` is dense in one of PyTorch's memory formats
(row-major, ``channels_last`` for 4-D, ``channels_last_3d`` for 5-D): it reads ``x`` in memory order,
writes ``y`` with ``x``'s strides (so ``y`` keeps the input's memory format, as ``torch.relu``'s
output does) and the mask bits in that same memory order. Any other layout (a transpose, a slice)
is copied to row-major first, so its bits are in row-major order. The backward lays ``grad`` out in
the forward's memory format (copying it only when it is not) and writes ``grad_in`` in it too.
"""

from __future__ import annotations

import math

import torch

_FORMAT_BY_RANK = {4: torch.channels_last, 5: torch.channels_last_3d}


def memory_format(x: torch.Tensor) -> torch.memory_format | None:
    """The memory format ``x`` is dense in (row-major first), or None when it is in none of them."""
    if x.is_contiguous():
        return torch.contiguous_format
    channels_last = _FORMAT_BY_RANK.get(x.dim())
    if channels_last is not None and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return None


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is row-major or channels-last dense, else a row-major copy."""
    return x if memory_format(x) is not None else x.contiguous()


def unpack_bits(bits: torch.Tensor, shape: tuple[int, ...], memory_format: torch.memory_format) -> torch.Tensor:
    """The bool mask of ``shape`` in ``memory_format`` that 8-per-byte ``bits`` (in memory order) encode."""
    n = math.prod(shape)
    lanes = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(-1) >> lanes) & 1).view(-1)[:n].bool()
    keep = torch.empty(shape, dtype=torch.bool, device=bits.device, memory_format=memory_format)
    keep.as_strided((n,), (1,)).copy_(flat)
    return keep
