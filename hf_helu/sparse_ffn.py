"""Sparse FFN modules: a ReLU FFN that reads only the weight rows of its active units, when that is faster.

At batch-1 decoding every FFN is a matrix-vector product bound by the bytes of weights read, and a unit whose
ReLU output is 0 needs neither its row of the up projection nor its row of the down projection. These modules
hold a transposed copy of the down projection (one contiguous row per unit) and call the fused kernel of
:mod:`hf_helu.ops.sparse_ffn_cpu` for a few rows; otherwise they run dense: without autograd as the bare ops
the original modules run (``F.linear``, ``torch.relu``: the same results without the module calls, so the swap
adds little to a dense call), under autograd or in training mode through the original modules.

Which path a call takes (:class:`Dispatch`): dense under autograd, in training mode, off the CPU, for a dtype
the kernel lacks, or for more rows than ``max_rows``; else sparse while the measured share of inactive units
(a running mean of what the kernel reports; the dense path re-measures every ``PROBE_EVERY`` calls) is at least
``min_sparsity``. The default break-even figures come from ``benchmarks/sparse_decode.py``.

Numerics: the sparse path adds the same non-zero products as the dense one, in another order (the kernel
sums over units in chunks per thread, then the thread sums; BLAS blocks differently), and skips only exact
zeros. In float32 each output is then within a few ulp of sum |h_j D_jk| times the number of terms of the
dense result; tests/test_sparse_ffn.py bounds it by that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_helu.ops import sparse_ffn_cpu

MODES = ("auto", "sparse", "dense")
# rows <= this take the kernel in "auto" mode (decode steps: batch x new tokens).
DEFAULT_MAX_ROWS = 1
# The share of inactive units below which "auto" runs dense: the kernel reads the gate in full and the up and
# down rows of active units, so it pays from low sparsity on; this margin keeps it off where it is a wash.
DEFAULT_MIN_SPARSITY = 0.2
PROBE_EVERY = 16  # dense calls between two sparsity measurements in "auto" mode
_SMOOTHING = 0.125  # weight of the newest measurement in the running mean of sparsity


def rows_of(weight: torch.Tensor, module: nn.Module, by_unit: bool) -> torch.Tensor:
    """``module``'s weight as ``[units, features]`` rows (a view when already so laid out, else a copy).

    ``by_unit=True`` for an input projection (Linear ``[out, in]`` is already one row per unit; Conv1D
    ``[in, out]`` is not); ``False`` for the down projection (Linear ``[out, in]`` needs the transpose).
    """
    is_conv1d = isinstance(module, Conv1D)
    if by_unit != is_conv1d:
        return weight.detach()
    return weight.detach().t().contiguous()


def torch_sparse_ffn(
    x: torch.Tensor,
    first: torch.Tensor,
    first_bias: torch.Tensor | None,
    second: torch.Tensor | None,
    second_bias: torch.Tensor | None,
    down_t: torch.Tensor,
    down_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """The kernel's computation in torch ops (the fallback and the tests' reference): same arguments, same result."""
    a = torch.relu(F.linear(x, first, first_bias))
    active = a.ne(0).any(0).nonzero().squeeze(1)
    h = a.index_select(1, active)
    if second is not None:
        bias = None if second_bias is None else second_bias.index_select(0, active)
        h = h * F.linear(x, second.index_select(0, active), bias)
    out = h @ down_t.index_select(0, active)
    if down_bias is not None:
        out = out + down_bias
    return out, active.numel()


def _project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a Linear without the module call; other projections (Conv1D) through their module."""
    if type(module) is nn.Linear:
        return F.linear(x, module.weight, module.bias)
    return module(x)


@dataclass
class Dispatch:
    """The per-module choice between the kernel and the dense modules, and what it has measured."""

    mode: str = "auto"
    max_rows: int = DEFAULT_MAX_ROWS
    min_sparsity: float = DEFAULT_MIN_SPARSITY
    sparsity: float = 1.0  # running mean of the share of units inactive in every row of a call
    sparse_calls: int = 0
    dense_calls: int = 0
    measured_rows: int = 0  # rows seen by the measurements below (decode: one per token)
    inactive_sum: float = 0.0  # sum over measured rows of the share of units at zero

    def wants_sparse(self, rows: int) -> bool:
        if self.mode != "auto":
            return self.mode == "sparse"
        return sparse_ffn_cpu.available() and rows <= self.max_rows and self.sparsity >= self.min_sparsity

    def record(self, union_active: int, units: int, rows: int, pair_active: int | None = None) -> None:
        """One measurement: units active in some row (what the kernel reads), and (row, unit) pairs when known."""
        self.sparsity += _SMOOTHING * (1.0 - union_active / units - self.sparsity)
        if rows == 1 or pair_active is not None:
            self.measured_rows += rows
            self.inactive_sum += rows - (union_active if pair_active is None else pair_active) / units

    @property
    def mean_sparsity(self) -> float | None:
        """Share of FFN activations at zero over the measured rows (None before any)."""
        return self.inactive_sum / self.measured_rows if self.measured_rows else None


class SparseFFN(nn.Module):
    """Base: the dispatcher around ``_sparse`` (kernel or torch ops) and ``_dense`` (the original modules)."""

    def __init__(self, units: int, dispatch: Dispatch):
        super().__init__()
        self.units = units
        self.dispatch = dispatch
        self._copy_key: tuple | None = None

    def _modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _ops_forward(self, x: torch.Tensor, probe: bool) -> torch.Tensor:
        raise NotImplementedError

    def _operands(self) -> tuple:
        raise NotImplementedError

    def _usable(self, x: torch.Tensor) -> bool:
        if self.training or x.device.type != "cpu" or x.dtype not in sparse_ffn_cpu.DTYPES:
            return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._sources())))

    def _sources(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        dispatch = self.dispatch
        if dispatch.mode != "sparse" and (rows > dispatch.max_rows or dispatch.mode == "dense"):
            dispatch.dense_calls += 1  # the common dense case (prefill, encoders) with no further checks
            return self._dense(x, probe=False)
        if rows == 0 or not self._usable(x) or not dispatch.wants_sparse(rows):
            dispatch.dense_calls += 1
            probe = dispatch.mode == "auto" and dispatch.dense_calls % PROBE_EVERY == 0
            return self._dense(x, probe=probe and rows > 0 and self._usable(x))
        dispatch.sparse_calls += 1
        operands = self._operands()
        flat = x.reshape(rows, x.shape[-1])
        if operands[0].dtype != x.dtype:
            flat = flat.to(operands[0].dtype)
        if sparse_ffn_cpu.available() and rows <= sparse_ffn_cpu.MAX_ROWS:
            out, active = sparse_ffn_cpu.sparse_ffn(flat, *operands)
        else:
            out, active = torch_sparse_ffn(flat, *operands)
        dispatch.record(active, self.units, rows)
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])

    def _dense(self, x: torch.Tensor, probe: bool) -> torch.Tensor:
        """The FFN as the original model computes it; without autograd as bare ops (no module calls), else the
        original modules (HeLU's backward, dropout in training mode). ``probe``: measure the zeros on the way."""
        if self.training or torch.is_grad_enabled():
            return self._modules_forward(x)
        return self._ops_forward(x, probe)

    def _record_zeros(self, act: torch.Tensor) -> None:
        nonzero = act.reshape(-1, self.units).ne(0)
        self.dispatch.record(int(nonzero.any(0).sum()), self.units, nonzero.shape[0], int(nonzero.sum()))

    def _stale(self) -> bool:
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in self._sources())
        if key == self._copy_key:
            return False
        self._copy_key = key
        return True

    @property
    def added_bytes(self) -> int:
        """Bytes of the weight copies this module holds (the transposed projections)."""
        return sum(t.numel() * t.element_size() for t in self._copies())

    def _copies(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError


class GatedSparseFFN(SparseFFN):
    """Replaces a LLaMA-style MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ReLU as ``act_fn``.

    Holds the same four submodules under the same names (the state dict keys do not change) and a transposed
    copy of ``down_proj.weight`` (not saved). Dense gate, then up and down rows of the active units.
    """

    def __init__(self, block: nn.Module, dispatch: Dispatch):
        super().__init__(block.down_proj.in_features, dispatch)
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            block.gate_proj,
            block.up_proj,
            block.down_proj,
            block.act_fn,
        )
        self.original = (block,)  # a tuple: not registered as a submodule
        self.down_t = torch.empty(0)
        self._refresh()

    def _sources(self) -> tuple[torch.Tensor, ...]:
        return (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)

    def _copies(self) -> tuple[torch.Tensor, ...]:
        return (self.down_t,)

    def _refresh(self) -> None:
        if self._stale():
            self.down_t = rows_of(self.down_proj.weight, self.down_proj, by_unit=False)

    def _operands(self) -> tuple:
        self._refresh()
        bias = lambda linear: None if linear.bias is None else linear.bias.detach()  # noqa: E731
        return (
            self.gate_proj.weight.detach(),
            bias(self.gate_proj),
            self.up_proj.weight.detach(),
            bias(self.up_proj),
            self.down_t,
            bias(self.down_proj),
        )

    def _modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def _ops_forward(self, x: torch.Tensor, probe: bool) -> torch.Tensor:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        act = torch.relu_(F.linear(x, gate.weight, gate.bias))  # ReLU/HeLU in eval mode is torch.relu
        if probe:
            self._record_zeros(act)
        return F.linear(act * F.linear(x, up.weight, up.bias), down.weight, down.bias)


class DeferredProjection(nn.Module):
    """Stands where a plain FFN's up projection was: passes its input on to the :class:`PlainSparseFFN` below.

    Keeps the projection's parameters under their names, so the state dict is unchanged.
    """

    def __init__(self, projection: nn.Module):
        super().__init__()
        self.weight = projection.weight
        self.bias = projection.bias
        self.original = (projection,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PlainSparseFFN(SparseFFN):
    """Stands where a plain FFN's down projection was, computing the whole ``down(relu(up(x)))``.

    The up projection's slot holds a :class:`DeferredProjection` and the activation's an ``nn.Identity``, so
    this module receives the FFN's input (BERT, GPT-2 and Whisper apply nothing else between them at inference:
    their dropout is off in eval mode). Keeps the down projection's parameters under their names.
    """

    def __init__(self, up: nn.Module, activation: nn.Module, down: nn.Module, dispatch: Dispatch):
        units = up.weight.shape[1] if isinstance(up, Conv1D) else up.weight.shape[0]
        super().__init__(units, dispatch)
        self.weight = down.weight
        self.bias = down.bias
        self.original = (up, activation, down)
        self.up_rows = self.down_t = torch.empty(0)
        self._refresh()

    def _sources(self) -> tuple[torch.Tensor, ...]:
        return (self.original[0].weight, self.weight)

    def _copies(self) -> tuple[torch.Tensor, ...]:
        up, _, down = self.original
        return tuple(t for t, m in ((self.up_rows, up), (self.down_t, down)) if t.data_ptr() != m.weight.data_ptr())

    def _refresh(self) -> None:
        if self._stale():
            up, _, down = self.original
            self.up_rows = rows_of(up.weight, up, by_unit=True)
            self.down_t = rows_of(down.weight, down, by_unit=False)

    def _operands(self) -> tuple:
        self._refresh()
        up = self.original[0]
        up_bias = None if up.bias is None else up.bias.detach()
        down_bias = None if self.bias is None else self.bias.detach()
        return (self.up_rows, up_bias, None, None, self.down_t, down_bias)

    def _modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        up, activation, down = self.original
        return down(activation(up(x)))

    def _ops_forward(self, x: torch.Tensor, probe: bool) -> torch.Tensor:
        up, _, down = self.original
        act = torch.relu_(_project(up, x))  # ReLU/HeLU in eval mode is torch.relu
        if probe:
            self._record_zeros(act)
        return _project(down, act)
