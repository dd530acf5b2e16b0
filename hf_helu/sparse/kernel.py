"""The sparse FFN's fused CPU kernel (``sparse_ffn.c``), built on first use and loaded with ctypes.

One call computes a ReLU FFN for a few rows over its active units only (see the C file's header): the dense gate
(or up) projection, then rows of the up projection and of the transposed down projection for the units whose
activation is non-zero. Weights are float32 or bfloat16, accumulation float32. The units are cut into a number of
chunks fixed by their count; the caller and the workers of the kernel's own thread pool (at most
``torch.get_num_threads()`` threads in all) take them one at a time, so the result does not depend on the thread
count or on any OpenMP setting.

The library is built, cached, verified and loaded by :mod:`hf_helu.ops.c_library`, exactly as the HeLU kernels
are, with ``-pthread`` instead of OpenMP: its workers sleep between calls rather than spin (the C file says why),
so a decode step does not take CPU time from a busy machine.
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
        "sparse_ffn_chunks": ([_I64], _I64),
    },
    package=__package__,
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
        _library, _ = KERNEL.load(
            variants=(("-pthread",), ()), fallback="The FFN runs dense (or, forced sparse, on torch ops) instead."
        )
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


def chunks(units: int) -> int:
    """How many chunks (each with its own accumulator) the kernel cuts ``units`` FFN units into."""
    return load().sparse_ffn_chunks(units)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check(x: torch.Tensor, operands: tuple[torch.Tensor | None, ...]) -> None:
    """The layout the C code assumes: every operand contiguous, of one dtype, on the CPU, of matching sizes."""
    first, down_t = operands[0], operands[4]
    rows, d = x.shape
    m, dout = down_t.shape
    shapes = {0: (m, d), 1: (m,), 2: (m, d), 3: (m,), 4: (m, dout), 5: (dout,)}
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"sparse_ffn takes 1 to {MAX_ROWS} rows, got {rows}")
    for i, t in enumerate(operands):
        if t is None:
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu":
            raise ValueError(f"sparse_ffn operand {i} must be a plain CPU tensor, got {type(t).__name__} on {t.device}")
        if t.dtype != first.dtype or first.dtype not in DTYPES:
            raise ValueError(f"sparse_ffn operands must share one dtype of {DTYPES}, got {first.dtype} and {t.dtype}")
        if tuple(t.shape) != shapes[i] or not t.is_contiguous():
            raise ValueError(
                f"sparse_ffn operand {i} must be contiguous of shape {shapes[i]}, got shape {tuple(t.shape)} "
                f"strides {t.stride()}"
            )


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
    bfloat16; a ValueError otherwise: the C code reads raw memory); ``active`` counts the units active in some row.
    """
    operands = (first, first_bias, second, second_bias, down_t, down_bias)
    _check(x, operands)
    lib = load()
    rows, d = x.shape
    m, dout = down_t.shape
    count = lib.sparse_ffn_chunks(m)
    scratch = torch.empty(count * rows * (dout + -(-m // count)), dtype=torch.float32)
    out = torch.empty(rows, dout, dtype=first.dtype)
    kernel = lib.sparse_ffn_f32 if first.dtype == torch.float32 else lib.sparse_ffn_bf16
    xf = x.to(torch.float32).contiguous()
    active = kernel(
        xf.data_ptr(),
        rows,
        d,
        m,
        dout,
        *(_pointer(t) for t in operands),
        out.data_ptr(),
        scratch.data_ptr(),
        torch.get_num_threads(),
    )
    if active < 0:
        raise RuntimeError(f"sparse FFN kernel refused its arguments (rows {rows}, units {m})")
    return out, active
