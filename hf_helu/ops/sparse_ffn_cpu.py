"""The sparse FFN's fused CPU kernel (``sparse_ffn.c``), built on first use and loaded with ctypes.

One call computes a ReLU FFN for a few rows over its active units only (see the C file's header):
the dense gate (or up) projection, then rows of the up projection and of the transposed down projection
for the units whose activation is non-zero. Weights are float32 or bfloat16, accumulation float32,
OpenMP on PyTorch's thread team (at most ``torch.get_num_threads()`` threads).

The library is built, cached, verified and loaded by :mod:`hf_helu.ops.c_library`, exactly as the HeLU
kernels are: the same compiler, cache folder, SHA-256 check before loading, rebuild with one RuntimeWarning when
the cached file is damaged or foreign, private build when the cache is unwritable, and OpenMP on PyTorch's thread
team when the compiler has it (else one thread).
"""

from __future__ import annotations

import ctypes

import torch

from hf_helu.ops import c_library

SOURCE_FILE = "sparse_ffn.c"
MAX_ROWS = 64  # SF_MAX_ROWS in the C file
DTYPES = (torch.float32, torch.bfloat16)
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_KERNEL_ARGS = [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _INT]
KERNEL = c_library.CLibrary(
    source_file=SOURCE_FILE,
    prefix="sparse_ffn",
    title="sparse FFN CPU kernel",
    kind="sparse FFN kernel library",
    signatures={
        "sparse_ffn_f32": (_KERNEL_ARGS, _I64),
        "sparse_ffn_bf16": (_KERNEL_ARGS, _I64),
        "sparse_ffn_team_size": ([_I64, _INT], _INT),
    },
)

_library: ctypes.CDLL | None = None
_failure: str | None = None


def load() -> ctypes.CDLL:
    """The compiled kernel (built and cached on first call); raises RuntimeError saying why not.

    Anything unusual on the way (a damaged cache, an unwritable cache folder) is told in one RuntimeWarning.
    """
    global _library, _failure
    if _library is not None:
        return _library
    if _failure is not None:
        raise RuntimeError(_failure)
    try:
        _library, _ = KERNEL.load(fallback="The FFN runs dense (or, forced sparse, on torch ops) instead.")
    except RuntimeError as error:
        _failure = str(error)
        raise
    return _library


def available() -> bool:
    """True when the kernel is (or can be) compiled and loaded on this machine."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def team_size(units: int, threads: int) -> int:
    """How many threads the kernel uses for ``units`` FFN units when allowed ``threads``."""
    return load().sparse_ffn_team_size(units, threads)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def sparse_ffn(
    x: torch.Tensor,
    first: torch.Tensor,
    first_bias: torch.Tensor | None,
    second: torch.Tensor | None,
    second_bias: torch.Tensor | None,
    down_t: torch.Tensor,
    down_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """``(out, active)`` for ``x`` of shape ``[rows, d]`` (rows <= :data:`MAX_ROWS`).

    ``h = relu(x @ first.T + first_bias) * (x @ second.T + second_bias)`` (the second factor only when
    ``second`` is given), ``out = h @ down_t + down_bias``, computed over the non-zero ``h`` only.
    ``first``/``second`` are ``[m, d]``, ``down_t`` ``[m, dout]``, all contiguous, of one dtype (float32 or
    bfloat16); ``active`` counts the (row, unit) pairs with a non-zero activation.
    """
    lib = load()
    rows, d = x.shape
    m, dout = down_t.shape
    threads = torch.get_num_threads()
    team = lib.sparse_ffn_team_size(m, threads)
    per = -(-m // team)
    scratch = torch.empty(team * rows * (dout + per), dtype=torch.float32)
    out = torch.empty(rows, dout, dtype=first.dtype)
    kernel = lib.sparse_ffn_f32 if first.dtype == torch.float32 else lib.sparse_ffn_bf16
    xf = x.to(torch.float32).contiguous()
    active = kernel(
        xf.data_ptr(),
        rows,
        d,
        m,
        dout,
        first.data_ptr(),
        _pointer(first_bias),
        _pointer(second),
        _pointer(second_bias),
        down_t.data_ptr(),
        _pointer(down_bias),
        out.data_ptr(),
        scratch.data_ptr(),
        threads,
    )
    return out, active
