"""The sparse FFN's fused CPU kernel (``sparse_ffn.c``), built on first use and loaded with ctypes.

One call computes a ReLU FFN for a few rows over its active units only (see the C file's header):
the dense gate (or up) projection, then rows of the up projection and of the transposed down projection
for the units whose activation is non-zero. Weights are float32 or bfloat16, accumulation float32,
OpenMP on PyTorch's thread team (at most ``torch.get_num_threads()`` threads).

The build reuses the HeLU kernels' machinery in :mod:`hf_helu.ops.cpu`: the same compiler choice, flags,
variants (with OpenMP, else without), cache folder and SHA-256 verification before loading. Only the source
and its file name differ, which ``cpu._build``/``cpu.library_path`` do not take as arguments, so the two
small functions that need them are here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from hf_helu.ops import cpu

SOURCE_FILE = "sparse_ffn.c"
MAX_ROWS = 64  # SF_MAX_ROWS in the C file
DTYPES = (torch.float32, torch.bfloat16)
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_KERNEL_ARGS = [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _INT]
_SIGNATURES = {
    "sparse_ffn_f32": (_KERNEL_ARGS, _I64),
    "sparse_ffn_bf16": (_KERNEL_ARGS, _I64),
    "sparse_ffn_team_size": ([_I64, _INT], _INT),
}

_library: ctypes.CDLL | None = None
_failure: str | None = None


@functools.cache
def source() -> str:
    """The C source of the kernel (``hf_helu/ops/sparse_ffn.c``, package data)."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


def library_path(compiler: str, extra_flags: tuple[str, ...]) -> Path:
    """Where the library built from this source is cached (beside the HeLU kernels, name hashing the source)."""
    folder = cpu.library_path(compiler, extra_flags).parent
    key = "\0".join((source(), *cpu._CFLAGS, *extra_flags, compiler, platform.system(), platform.machine()))
    return folder / f"sparse_ffn_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(compiler: str, extra_flags: tuple[str, ...], path: Path) -> None:
    """``cpu._build`` for this source: compile in a temp folder, write the checksum, rename both into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        code, target = Path(tmp) / SOURCE_FILE, Path(tmp) / path.name
        code.write_text(source(), encoding="utf-8")
        done = subprocess.run(
            [compiler, *cpu._CFLAGS, *extra_flags, "-o", target.name, code.name],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build the sparse FFN kernel:\n{done.stderr[-2000:]}")
        checksum = Path(tmp) / cpu.checksum_path(path).name
        checksum.write_text(cpu._digest(target) + "\n", encoding="ascii")
        os.replace(checksum, cpu.checksum_path(path))
        os.replace(target, path)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def _load_variant(compiler: str, extra_flags: tuple[str, ...], notes: list[str]) -> ctypes.CDLL:
    path = library_path(compiler, extra_flags)
    if path.exists():
        problem = cpu.verify(path)
        if problem is None:
            return _open(path)
        notes.append(f"{path} failed verification ({problem}), so it was not loaded and is rebuilt")
    try:
        _build(compiler, extra_flags, path)
    except OSError as error:
        notes.append(f"cannot write the kernel cache {path.parent} ({error}); built in a temporary folder")
        with tempfile.TemporaryDirectory(prefix="hf_helu-") as tmp:
            private = Path(tmp) / path.name
            _build(compiler, extra_flags, private)
            return _open(private)
    return _open(path)


def load() -> ctypes.CDLL:
    """The compiled kernel (built and cached on first call); raises RuntimeError saying why not."""
    global _library, _failure
    if _library is not None:
        return _library
    if _failure is not None:
        raise RuntimeError(_failure)
    compiler = cpu._compiler()
    errors = [] if compiler else ["no C compiler found (set CC, or install cc/gcc/clang)"]
    notes: list[str] = []
    for extra_flags in cpu._VARIANTS if compiler else ():
        try:
            _library = _load_variant(compiler, extra_flags, notes)
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(f"[{' '.join(extra_flags) or 'plain'}] {error}")
    if notes:
        warnings.warn("sparse FFN kernel: " + "; ".join(notes), RuntimeWarning, stacklevel=2)
    if _library is None:
        _failure = "sparse FFN CPU kernel unavailable: " + "; ".join(errors)
        raise RuntimeError(_failure)
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
