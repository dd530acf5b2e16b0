"""Inputs and checks shared by the ``test_ops*`` modules (imported as ``ops_helpers``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from hf_helu.ops import cpu

ALPHA = 0.05


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, to compare bit for bit (-0.0 vs 0.0, NaN payloads)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@contextlib.contextmanager
def recording_saved_tensors() -> Iterator[list[torch.Tensor]]:
    """The list of every tensor autograd saves inside the block, in order (a pack hook that keeps them)."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def skip_if_unavailable(backend: str) -> None:
    """Skip the calling test when ``backend`` cannot run here (the "c" backend without a C compiler)."""
    if backend == "c" and not cpu.available():
        pytest.skip(f"no C compiler: {cpu.why_unavailable()}")


def sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values around both kinks (0 and -alpha), plus -alpha and 0 exactly where there is room."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    flat = x.view(-1)
    if flat.numel() >= 4:
        flat[:4] = torch.tensor([-ALPHA, 0.0, -0.0, ALPHA]).to(dtype)
    return x
