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

Tensors of at least 2 x ``GRAIN`` elements are split over ``torch.get_num_threads()`` threads with
OpenMP. Built with ``-fopenmp``, the library links ``libgomp.so.1``, which resolves to the copy
PyTorch has already loaded, so the kernels run on PyTorch's own warm thread team: waking Python threads
instead costs as much as a medium-sized relu (figures in BENCHMARKS.md).

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$HF_HELU_CACHE_DIR`` (default ``~/.cache/hf_helu``) once per source version (the file name hashes the
C text, the flags and the compiler); with OpenMP if the compiler can, else without (one
thread). Without a compiler :func:`available` is False and HeLU uses the torch backend.

A cached library is loaded only after its bytes match the SHA-256 written beside it (``<name>.so.sha256``)
when it was built; one that does not (truncated, replaced, corrupted), or that matches but is no HeLU kernel
library, is rebuilt, with one RuntimeWarning naming the file. An unwritable cache folder gets the library built
in a private temp folder, also with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from hf_helu.ops import layout

CACHE_ENV_VAR = "HF_HELU_CACHE_DIR"
_HALF_INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SOURCE_FILE = "helu_cpu.c"


@functools.cache
def source() -> str:
    """The C source of the kernels (``hf_helu/ops/helu_cpu.c``, shipped as package data)."""
    return importlib.resources.files(__package__).joinpath(SOURCE_FILE).read_text(encoding="utf-8")


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
_CFLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", f"-DHELU_GRAIN={GRAIN}")
# Tried in order: with OpenMP (which joins PyTorch's OpenMP runtime when it is already loaded, so
# the kernels share its warm thread team), then without (one thread).
_VARIANTS = (("-fopenmp",), ())

_library: ctypes.CDLL | None = None
_failure: str | None = None
_parallel = False


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def library_path(compiler: str, extra_flags: tuple[str, ...]) -> Path:
    """Where the library built from this source by ``compiler`` (with ``extra_flags``) is cached."""
    root = os.environ.get(CACHE_ENV_VAR) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_helu"
    key = "\0".join((source(), *_CFLAGS, *extra_flags, compiler, platform.system(), platform.machine()))
    return Path(root) / f"helu_cpu_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def checksum_path(path: Path) -> Path:
    """The file beside a cached library that holds the SHA-256 of the bytes built there."""
    return path.with_name(path.name + ".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(path: Path) -> str | None:
    """None when ``path`` holds exactly the bytes whose checksum was written beside it at build time, else why not.

    A library is never loaded unverified: a truncated one dies with SIGBUS when the loader touches a
    missing page, and a foreign one lacks our symbols or runs other code.
    """
    try:
        expected = checksum_path(path).read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return f"no checksum file {checksum_path(path).name} beside it"
    except (OSError, UnicodeDecodeError) as error:
        return f"its checksum file cannot be read ({error})"
    try:
        actual = _digest(path)
    except OSError as error:
        return f"it cannot be read ({error})"
    if actual != expected:
        return "its bytes do not match the checksum written when it was built (truncated, replaced or corrupted)"
    return None


def _build(compiler: str, extra_flags: tuple[str, ...], path: Path) -> None:
    """Compile in a temp folder beside ``path``, then rename the library and its checksum into place.

    Each rename is atomic, so a reader never sees a half-written file; the build is deterministic (same
    source, flags and compiler give the same bytes, checked on gcc), so two processes building at once agree.
    Raises RuntimeError when the compiler fails, OSError when the folder cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        code, target = Path(tmp) / SOURCE_FILE, Path(tmp) / path.name
        code.write_text(source(), encoding="utf-8")
        done = subprocess.run(
            [compiler, *_CFLAGS, *extra_flags, "-o", target.name, code.name],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build the HeLU CPU kernels:\n{done.stderr[-2000:]}")
        checksum = Path(tmp) / checksum_path(path).name
        checksum.write_text(_digest(target) + "\n", encoding="ascii")
        # Checksum first: a process that looks in between sees no library yet (and builds the same bytes), never
        # a fresh library without its checksum.
        os.replace(checksum, checksum_path(path))
        os.replace(target, path)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        try:
            function = getattr(lib, name)
        except AttributeError:
            raise RuntimeError(f"{path} does not export {name}: not a HeLU kernel library") from None
        function.argtypes, function.restype = argtypes, restype
    return lib


def _load_variant(compiler: str, extra_flags: tuple[str, ...], notes: list[str]) -> ctypes.CDLL:
    """Load the verified cached library, (re)building it first when it is missing or fails verification.

    A verified library that is no HeLU kernel library (a foreign file written with its checksum) is rebuilt in
    place too; this process loads the rebuilt bytes from a private copy, since the loader would hand back the
    foreign library already mapped under that path. ``notes`` collects what went wrong, for the one warning
    :func:`load` gives.
    """
    path = library_path(compiler, extra_flags)
    if path.exists():
        problem = verify(path)
        if problem is None:
            try:
                return _open(path)
            except (OSError, RuntimeError) as error:
                notes.append(f"{path} matches its checksum but is no HeLU kernel library ({error}), so it is rebuilt")
                return _build_and_open(compiler, extra_flags, path, notes, private_copy=True)
        notes.append(f"{path} failed verification ({problem}), so it was not loaded and is rebuilt")
    return _build_and_open(compiler, extra_flags, path, notes, private_copy=False)


def _open_private(library: Path, build: tuple[str, tuple[str, ...]] | None = None) -> ctypes.CDLL:
    """Open a copy of ``library`` (or, with ``build``, a fresh build) in a temp folder deleted once it is mapped."""
    with tempfile.TemporaryDirectory(prefix="hf_helu-") as tmp:
        private = Path(tmp) / library.name
        if build is None:
            shutil.copyfile(library, private)
        else:
            _build(*build, private)
        return _open(private)


def _build_and_open(
    compiler: str, extra_flags: tuple[str, ...], path: Path, notes: list[str], private_copy: bool
) -> ctypes.CDLL:
    """Build into the cache and open it; an unwritable cache gets a build in a private temp folder instead (slower
    to start, never a silent fall back to the torch backend)."""
    try:
        _build(compiler, extra_flags, path)
    except OSError as error:
        notes.append(
            f"cannot write the kernel cache {path.parent} ({error}); the kernels were built in a temporary folder "
            f"for this process only (set {CACHE_ENV_VAR} to a writable folder to keep them)"
        )
        return _open_private(path, build=(compiler, extra_flags))
    return _open_private(path) if private_copy else _open(path)


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
    errors: list[str] = []
    notes: list[str] = []
    compiler = _compiler()
    if compiler is None:
        errors.append("no C compiler found (set CC, or install cc/gcc/clang)")
    for extra_flags in _VARIANTS if compiler else ():
        try:
            _library, _parallel = _load_variant(compiler, extra_flags, notes), bool(extra_flags)
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            errors.append(f"[{' '.join(extra_flags) or 'plain'}] {error}")
    if _library is None:
        _failure = "HeLU CPU kernels unavailable: " + "; ".join(errors)
    if notes or (_library is None and compiler is not None):
        fallback = "" if _library is not None else f" The torch backend is used instead. {_failure}"
        warnings.warn("HeLU CPU kernels: " + "; ".join(notes) + fallback, RuntimeWarning, stacklevel=2)
    if _library is None:
        raise RuntimeError(_failure)
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
