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


def gradcheck_points(alpha: float = ALPHA) -> torch.Tensor:
    """float64 points over [-0.2, 0.2] in steps of 0.01, clear of the kinks at 0 and -alpha by more than gradcheck's
    eps, four of them inside HeLU's band (-alpha, 0), where its gradient passes and ReLU's does not."""
    x = torch.linspace(-0.2, 0.2, 41, dtype=torch.float64) + 0.001
    x = x[((x.abs() > 1e-3) & ((x + alpha).abs() > 1e-3))]
    assert ((x > -alpha) & (x < 0)).sum() >= 4
    return x.reshape(-1, 1)


def with_helu_derivative(act, alpha: float = ALPHA):
    """``act`` plus a constant that turns its value into ``x * [x > -alpha]``, the function whose derivative is
    HeLU's gradient. gradcheck compares ``act``'s backward with finite differences of that value, so it checks the
    gradient inside the band too (a finite difference of ``relu`` itself is 0 there)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        offset = torch.where(x > -alpha, x, torch.zeros(())) - torch.relu(x)
        return act(x) + offset.detach()

    return fn
