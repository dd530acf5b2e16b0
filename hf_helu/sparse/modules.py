"""Sparse FFN modules: a ReLU FFN that reads only the weight rows of its active units, when that is faster.

At batch-1 decoding every FFN is a matrix-vector product bound by the bytes of weights read, and a unit whose
ReLU output is 0 needs neither its row of the up projection nor its row of the down projection. These modules
call the fused kernel of :mod:`hf_helu.sparse.kernel` for a few rows; otherwise they run dense: without autograd
as the bare ops the original modules run (``F.linear``, ``torch.relu``), under autograd or in training mode as
the original modules compute (HeLU's backward included).

Weights, always current. The kernel reads each FFN weight as one contiguous row per unit. Rather than keep a
copy (which an in-place edit through ``.data`` would silently leave stale), a module stores each such parameter
in that layout: same parameter object, same values, only the strides change (a Linear down projection becomes
column-major), and ``F.linear``/``addmm`` read either layout. The kernel then reads the parameter's own memory,
so in-place edits (``weight.data.mul_``, ``load_state_dict``) reach it at once; a parameter replaced or given a
new storage, dtype or layout (``load_state_dict(assign=True)``, ``model.to(torch.bfloat16)``, ``weight.data =
...``) is seen by its identity, data pointer, dtype, shape and strides before the next call and laid out again.
:meth:`SparseFFN.release` (``handle.remove()``) puts every parameter back in its original strides.

Which path a call takes (:class:`Dispatch`): dense inside ``torch.compile`` (traced as torch ops, the kernel
stays out of graphs), under autograd, in training mode, off the CPU, for a dtype the kernel lacks, or for more rows
than ``max_rows``. Otherwise, in ``"auto"`` mode, the path measured faster on this machine now, timed a whole
decode step at a time (:class:`StepClock`): each path's last few step times are kept, the other path is tried
every ``PROBE_EVERY`` steps, and a module runs sparse only while its measured share of inactive units is at least
``min_sparsity``. So wherever the kernel loses (a machine whose dense path is faster), the dense path takes over.

Numerics: the sparse path adds the same non-zero products as the dense one, in another order, and skips inactive
units entirely. So a non-finite weight of a unit that is off for a token does not reach that token's output,
where dense computes ``0 x inf = NaN``: the sparse output is the dense output of the same weights with that
unit's non-finite entries set to zero. A module warns when its weights hold non-finite values.
"""

from __future__ import annotations

import statistics
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_helu.sparse import kernel

MODES = ("auto", "sparse", "dense")
# rows <= this take the kernel in "auto" mode (decode steps: batch x new tokens).
DEFAULT_MAX_ROWS = 1
# The share of inactive units below which "auto" runs dense: the kernel reads the gate in full and the up and
# down rows of active units, so it pays from low sparsity on; this margin keeps it off where it is a wash.
DEFAULT_MIN_SPARSITY = 0.2
PROBE_EVERY = 16  # decode steps between two tries of the path not preferred in "auto" mode (time and zeros)
TIMINGS_KEPT = 7  # latest step times per path; their median decides
_SMOOTHING = 0.125  # weight of the newest measurement in the running mean of sparsity


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


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> torch.Tensor:
    """What a Linear (``conv1d=False``) or a transformers Conv1D with these parameters computes on ``x``."""
    if not conv1d:
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    out = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return out.view(*x.shape[:-1], weight.shape[1])


@dataclass
class StepClock:
    """Which path the decode steps of one swapped model take in ``"auto"`` mode, timed a whole step at a time.

    A step runs from one call of the first module that asks (the pacer: layer 0's FFN at decoding) to its next
    call, so a step's time holds everything the path costs, also outside the FFN calls: a path whose threads
    spin-wait after their work takes CPU time from the attention that follows, which timing the FFN calls alone
    cannot see (beside a busy process that made the dense path lose 4x while its calls looked fast). Every module
    of a step takes the step's path where it can; a call that cannot be a decode step (prefill, more rows than
    ``max_rows``) voids the step under way. The path not preferred is tried every ``PROBE_EVERY`` steps.
    """

    pacer: int | None = None  # id of the Dispatch whose calls open the steps
    started: int | None = None  # perf_counter_ns at the start of the step under way; None: not timed
    sparse: bool = True  # the path of the step under way
    probe: bool = False  # the step under way tries the path not preferred
    steps: int = 0
    kernel_slower: bool = False  # dense_faster as of the latest probe
    times: dict[bool, list[int]] = field(default_factory=lambda: {True: [], False: []})  # ns per step, by sparse?

    def start_step(self, now: int) -> None:
        """Close the step under way (keep its time) and choose the next one's path."""
        if self.started is not None:
            kept = self.times[self.sparse]
            kept.append(now - self.started)
            del kept[:-TIMINGS_KEPT]
        self.steps += 1
        if self.steps % PROBE_EVERY == 1:  # once per window, after the probe: which path is faster now
            self.kernel_slower = self.dense_faster
        self.probe = self.steps % PROBE_EVERY == 0
        self.sparse = self.kernel_slower == self.probe
        self.started = now

    def void(self) -> None:
        """The step under way holds a call that is not a decode step: its time says nothing."""
        self.started = None

    @property
    def dense_faster(self) -> bool:
        """True when both paths have been timed and dense's median step time is the lower."""
        sparse, dense = self.times[True], self.times[False]
        return bool(sparse and dense) and statistics.median(dense) < statistics.median(sparse)


@dataclass
class Dispatch:
    """The per-module choice between the kernel and the dense ops, and what it has measured."""

    mode: str = "auto"
    max_rows: int = DEFAULT_MAX_ROWS
    min_sparsity: float = DEFAULT_MIN_SPARSITY
    clock: StepClock = field(default_factory=StepClock)  # shared by the modules of one swapped model
    sparsity: float = 1.0  # running mean of the share of units inactive in every row of a call
    sparse_calls: int = 0
    dense_calls: int = 0
    measured_rows: int = 0  # rows seen by the measurements below (decode: one per token)
    inactive_sum: float = 0.0  # sum over measured rows of the share of units at zero

    def choose(self, kernel_ok: bool) -> tuple[bool, bool]:
        """``(sparse, probe)`` for a call either path could take (``probe``: the dense ops measure the zeros)."""
        if self.mode != "auto":
            return self.mode == "sparse", False
        clock = self.clock
        if clock.pacer is None:
            clock.pacer = id(self)
        if clock.pacer == id(self):
            clock.start_step(time.perf_counter_ns())
        sparse = clock.sparse and kernel_ok and self.sparsity >= self.min_sparsity
        return sparse, not sparse and clock.probe

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


def _lay_out(param: torch.Tensor, unit_first: bool, relaid: dict) -> None:
    """Store ``param`` so that its unit rows (``param``, or ``param.t()``) are contiguous; same object and values.

    The first change of a parameter records its original strides in ``relaid`` (for :meth:`SparseFFN.release`).
    """
    rows = param if unit_first else param.t()
    if rows.is_contiguous():
        return
    relaid.setdefault(id(param), (weakref.ref(param), tuple(param.stride())))
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even when called under inference_mode
        laid = rows.detach().contiguous()
        param.data = laid if unit_first else laid.t()


def _restore(param: torch.Tensor, stride: tuple[int, ...]) -> None:
    if tuple(param.stride()) == stride:
        return
    with torch.inference_mode(False), torch.no_grad():
        param.data = torch.empty_strided(param.shape, stride, dtype=param.dtype, device=param.device).copy_(param)


class SparseFFN(nn.Module):
    """Base: the dispatcher around the kernel and the dense ops; keeps the weights in the kernel's layout."""

    def __init__(self, units: int, dispatch: Dispatch):
        super().__init__()
        self.units = units
        self.dispatch = dispatch
        self._key: tuple | None = None
        self._operands: tuple | None = None  # views of the parameters the kernel reads; None: they cannot go there
        self._relaid: dict[int, tuple[weakref.ref, tuple[int, ...]]] = {}

    # --- what a subclass says ---
    def _weights(self) -> tuple[tuple[torch.Tensor | None, bool], ...]:
        """The kernel's six operands' sources in its order: ``(tensor or None, unit_first)``."""
        raise NotImplementedError

    def _modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _ops_forward(self, x: torch.Tensor, probe: bool) -> torch.Tensor:
        raise NotImplementedError

    # --- the weights the kernel reads ---
    def kernel_operands(self) -> tuple | None:
        """The kernel's operands as views of the current parameters (laid out first when they are new or were
        re-assigned, re-dtyped or re-laid); None when they cannot go to the kernel (mixed dtypes, off the CPU)."""
        weights = self._weights()
        key = tuple(
            None if t is None else (id(t), t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t, _ in weights
        )
        if key != self._key:
            self._operands = self._lay_out_all(weights)
            self._key = tuple(
                None if t is None else (id(t), t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) for t, _ in weights
            )
        return self._operands

    def _lay_out_all(self, weights: tuple[tuple[torch.Tensor | None, bool], ...]) -> tuple | None:
        present = [t for t, _ in weights if t is not None]
        dtype = present[0].dtype
        if dtype not in kernel.DTYPES or any(t.dtype != dtype or t.device.type != "cpu" for t in present):
            return None
        for t, unit_first in weights:
            if t is not None:
                _lay_out(t, unit_first, self._relaid)
        if not all(bool(torch.isfinite(t).all()) for t in present):
            warnings.warn(
                f"{type(self).__name__}: FFN weights hold non-finite values; the sparse path skips the units that "
                "are off for a token, so where dense gives NaN (0 x inf) it gives the finite dense result of those "
                "weights with the off units' non-finite entries set to zero",
                RuntimeWarning,
                stacklevel=4,
            )
        return tuple(None if t is None else (t if u else t.t()).detach() for t, u in weights)

    def release(self) -> None:
        """Put every parameter this module laid out back in its original strides and drop the views it held."""
        for ref, stride in self._relaid.values():
            param = ref()
            if param is not None:
                _restore(param, stride)
        self._relaid.clear()
        self._key = self._operands = None

    # --- dispatch ---
    def _usable(self, x: torch.Tensor) -> bool:
        if self.training or type(x) is not torch.Tensor or x.device.type != "cpu" or x.dtype not in kernel.DTYPES:
            return False
        if not torch.is_grad_enabled():
            return True
        return not (x.requires_grad or any(t is not None and t.requires_grad for t, _ in self._weights()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced as torch ops: the ctypes kernel stays out of compiled graphs
            return self._dense(x, probe=False)
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        dispatch = self.dispatch
        forced = dispatch.mode == "sparse"
        if rows == 0 or dispatch.mode == "dense" or (rows > dispatch.max_rows and not forced) or not self._usable(x):
            dispatch.dense_calls += 1  # the common dense case (prefill, encoders) with few checks
            dispatch.clock.void()
            return self._dense(x, probe=False)
        operands = self.kernel_operands()
        if operands is None or operands[0].dtype != x.dtype:
            dispatch.dense_calls += 1
            return self._dense(x, probe=False)
        kernel_ok = rows <= kernel.MAX_ROWS and kernel.available()
        sparse, probe = dispatch.choose(kernel_ok)
        if sparse:
            dispatch.sparse_calls += 1
            return self._sparse(x, rows, operands, kernel_ok)
        dispatch.dense_calls += 1
        return self._dense(x, probe=probe)

    def _sparse(self, x: torch.Tensor, rows: int, operands: tuple, kernel_ok: bool) -> torch.Tensor:
        flat = x.reshape(rows, x.shape[-1])
        if kernel_ok:
            out, active = kernel.sparse_ffn(flat, *operands)
        else:
            out, active = torch_sparse_ffn(flat, *operands)
        self.dispatch.record(active, self.units, rows)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _dense(self, x: torch.Tensor, probe: bool) -> torch.Tensor:
        """The FFN as the original model computes it; without autograd as bare ops (no module calls), else as the
        original modules do (HeLU's backward, dropout in training mode). ``probe``: measure the zeros on the way."""
        if self.training or torch.is_grad_enabled():
            return self._modules_forward(x)
        return self._ops_forward(x, probe)

    def _record_zeros(self, act: torch.Tensor) -> None:
        nonzero = act.reshape(-1, self.units).ne(0)
        self.dispatch.record(int(nonzero.any(0).sum()), self.units, nonzero.shape[0], int(nonzero.sum()))


class GatedSparseFFN(SparseFFN):
    """Replaces a LLaMA-style MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with ReLU as ``act_fn``.

    Holds the same four submodules under the same names (the state dict keys do not change). Dense gate, then the
    up and down rows of the active units; ``down_proj.weight`` is kept column-major while swapped.
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

    def _weights(self) -> tuple[tuple[torch.Tensor | None, bool], ...]:
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        return ((gate.weight, True), (gate.bias, True), (up.weight, True), (up.bias, True), (down.weight, False),
                (down.bias, True))  # fmt: skip

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
    their dropout is off in eval mode). Keeps the down projection's parameters under their names; every path reads
    the parameters these two stand-ins hold now, and :meth:`release` hands them to the original modules.
    """

    def __init__(self, up: DeferredProjection, activation: nn.Module, down: nn.Module, dispatch: Dispatch):
        original_up = up.original[0]
        self_conv = isinstance(original_up, Conv1D)
        super().__init__(up.weight.shape[1] if self_conv else up.weight.shape[0], dispatch)
        self.weight = down.weight
        self.bias = down.bias
        self.up_conv1d, self.down_conv1d = self_conv, isinstance(down, Conv1D)
        self.original = (original_up, activation, down)
        self.deferred = (up,)  # a tuple: not registered (it is registered where the up projection was)

    def _weights(self) -> tuple[tuple[torch.Tensor | None, bool], ...]:
        up = self.deferred[0]
        return ((up.weight, not self.up_conv1d), (up.bias, True), (None, True), (None, True),
                (self.weight, self.down_conv1d), (self.bias, True))  # fmt: skip

    def release(self) -> None:
        """Also give the original up and down projections the parameters the stand-ins hold now (a
        ``load_state_dict(assign=True)`` replaced the stand-ins' ones)."""
        up, _, down = self.original
        for module, holder in ((up, self.deferred[0]), (down, self)):
            for name in ("weight", "bias"):
                if getattr(module, name) is not getattr(holder, name):
                    setattr(module, name, getattr(holder, name))
        super().release()

    def _modules_forward(self, x: torch.Tensor) -> torch.Tensor:
        up, activation = self.deferred[0], self.original[1]
        hidden = activation(project(x, up.weight, up.bias, self.up_conv1d))
        return project(hidden, self.weight, self.bias, self.down_conv1d)

    def _ops_forward(self, x: torch.Tensor, probe: bool) -> torch.Tensor:
        up = self.deferred[0]
        act = torch.relu_(project(x, up.weight, up.bias, self.up_conv1d))  # ReLU/HeLU in eval mode is torch.relu
        if probe:
            self._record_zeros(act)
        return project(act, self.weight, self.bias, self.down_conv1d)
