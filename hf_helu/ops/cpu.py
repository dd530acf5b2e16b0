"""The ``"c"`` backend: HeLU's fused CPU kernels, built from ``helu_cpu.c`` on first use and loaded with ctypes.

PyTorch's CPU ops cannot compute ``relu(x)`` and a packed mask in one pass, and its comparison
kernels are slow, so HeLU built from torch ops costs well above ReLU on CPU (BENCHMARKS.md). The C kernels
(``hf_helu/ops/helu_cpu.c``, package data) do

    forward:   read x once, write y = relu(x) and bits (bit i%8 of byte i/8 = not (x[i] <= threshold))
    backward:  read grad and bits once, write grad_in = grad where the bit is set, else +0.0

(the backward as a bitwise AND, so it is exactly ReLU's ``threshold_backward`` when alpha = 0).
AVX2 is used when the CPU has it (chosen at run time, so the cached library is portable), else
plain loops. float16/bfloat16 work on the raw bits; an input holding a NaN takes its ``y`` from
``torch.relu`` instead, whose NaN payloads differ between its own vector and scalar code.

Tensors of at least 2 x ``GRAIN`` elements are cut into pieces of ``GRAIN`` elements that up to
``torch.get_num_threads()`` OpenMP threads take one at a time (so a thread another process has descheduled holds up
one piece, not half the tensor). Built with ``-fopenmp``, the library links ``libgomp.so.1``, which resolves to the copy
PyTorch has already loaded, so the kernels run on PyTorch's own warm thread team: waking Python threads
instead costs as much as a medium-sized relu (figures in BENCHMARKS.md).

The library is built, cached, verified and loaded by :mod:`hf_helu.ops.c_library` (cache folder
``$HF_HELU_CACHE_DIR``, SHA-256 check before loading, rebuild with one RuntimeWarning when damaged, private build
when the cache is unwritable), with OpenMP if the compiler can, else without (one thread). Without a compiler
:func:`available` is False and HeLU uses the torch backend.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from hf_helu.ops import c_library, layout
from hf_helu.ops.c_library import CACHE_ENV_VAR as CACHE_ENV_VAR  # re-exported: the cache's public names
from hf_helu.ops.c_library import checksum_path as checksum_path
from hf_helu.ops.c_library import verify as verify

_HALF_INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SOURCE_FILE = "helu_cpu.c"

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "helu_forward_f32": ([_P, ctypes.c_float, _P, _P, _I64, _INT], None),
    "helu_forward_f64": ([_P, ctypes.c_double, _P, _P, _I64, _INT], None),
    "helu_forward_h16": ([_P, ctypes.c_int16, ctypes.c_int16, _P, _P, _I64, _INT], _INT),
    "helu_backward_u16": ([_P, _P, _P, _I64, _INT], None),
    "helu_backward_u32": ([_P, _P, _P, _I64, _INT], None),
    "helu_backward_u64": ([_P, _P, _P, _I64, _INT], None),
    "helu_team_size": ([_I64, _INT], _INT),
}
_BACKWARD_BY_SIZE = {2: "helu_backward_u16", 4: "helu_backward_u32", 8: "helu_backward_u64"}

# Fewest elements worth a thread of their own: PyTorch's own grain size for elementwise ops.
GRAIN = 32768
KERNELS = c_library.CLibrary(
    source_file=SOURCE_FILE,
    prefix="helu_cpu",
    title="HeLU CPU kernels",
    kind="HeLU kernel library",
    signatures=_SIGNATURES,
    cflags=(*c_library.BASE_CFLAGS, f"-DHELU_GRAIN={GRAIN}"),
)
_VARIANTS = c_library.OPENMP_VARIANTS
_compiler = c_library.compiler

_library: ctypes.CDLL | None = None
_failure: str | None = None
_parallel = False


def source() -> str:
    """The C source of the kernels (``hf_helu/ops/helu_cpu.c``, shipped as package data)."""
    return KERNELS.source()


def library_path(compiler: str, extra_flags: tuple[str, ...]) -> Path:
    """Where the library built from this source by ``compiler`` (with ``extra_flags``) is cached."""
    return KERNELS.library_path(compiler, extra_flags, source())


def load() -> ctypes.CDLL:
    """The compiled kernels (built and cached on first call); raises RuntimeError saying why not.

    Anything unusual on the way (a damaged cache, an unwritable cache folder, no kernels at all despite a
    compiler) is told in one RuntimeWarning naming the file.
    """
    global _library, _failure, _parallel
    if _library is not None:
        return _library
    if _failure is not None:
        raise RuntimeError(_failure)
    try:
        library, extra_flags = KERNELS.load(_VARIANTS, fallback="The torch backend is used instead.")
    except RuntimeError as error:
        _failure = str(error)
        raise
    _library, _parallel = library, bool(extra_flags)
    return _library


def why_unavailable() -> str | None:
    """Why the kernels cannot be compiled or loaded on this machine; None when they can."""
    try:
        load()
    except RuntimeError as error:
        return str(error)
    return None


def available() -> bool:
    """True when the kernels are (or can be) compiled and loaded on this machine."""
    return why_unavailable() is None


def parallel() -> bool:
    """True when the loaded kernels split large tensors over ``torch.get_num_threads()`` OpenMP threads."""
    load()
    return _parallel


def team_size(n: int, threads: int) -> int:
    """How many threads the kernels use for ``n`` elements when allowed ``threads``."""
    return load().helu_team_size(n, threads)


def _half_key(value: int) -> int:
    return -(value & 0x7FFF) if value & 0x8000 else value


def helu_forward(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), bits)`` for a CPU tensor; bits hold ``not (x <= threshold)``, 8 per byte."""
    lib = load()
    x = layout.dense(x.detach())
    n, threads = x.numel(), torch.get_num_threads()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    if x.dtype in _HALF_INF_BITS:
        y = torch.empty_like(x)
        raw = torch.tensor(threshold, dtype=x.dtype).view(torch.int16).item() & 0xFFFF
        key, inf = _half_key(raw), _HALF_INF_BITS[x.dtype]
        if lib.helu_forward_h16(x.data_ptr(), key, inf, y.data_ptr(), bits.data_ptr(), n, threads):
            y = torch.relu(x)  # a NaN: take torch.relu's own NaN bits
        return y, bits
    y = torch.empty_like(x)
    forward = lib.helu_forward_f32 if x.dtype == torch.float32 else lib.helu_forward_f64
    forward(x.data_ptr(), threshold, y.data_ptr(), bits.data_ptr(), n, threads)
    return y, bits


def helu_backward(
    grad: torch.Tensor,
    bits: torch.Tensor,
    shape: torch.Size,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """``grad`` where the mask bit is set, else +0.0: shaped ``shape``, in the forward's ``memory_format``."""
    grad = grad.contiguous(memory_format=memory_format)
    out = torch.empty(shape, dtype=grad.dtype, memory_format=memory_format)
    backward = getattr(load(), _BACKWARD_BY_SIZE[grad.element_size()])
    backward(grad.data_ptr(), bits.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads())
    return out
