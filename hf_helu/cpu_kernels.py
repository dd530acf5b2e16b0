"""Fused CPU kernels for HeLU: one pass each way with a bit-packed mask, compiled on first use.

PyTorch's CPU ops cannot compute ``relu(x)`` and a packed mask in one pass, and its comparison
kernels are slow, so HeLU built from torch ops costs 2-3x ReLU on CPU. These few lines of C do

    forward:   read x once, write y = relu(x) and bits (bit i%8 of byte i/8 = not (x[i] <= threshold))
    backward:  read grad and bits once, write grad_in = grad where the bit is set, else +0.0

(the backward as a bitwise AND, so it is exactly ReLU's ``threshold_backward`` when alpha = 0).
AVX2 is used when the CPU has it (chosen at run time, so the cached library is portable), else
plain loops. float16/bfloat16 forwards take ``y`` from ``torch.relu`` (it rewrites NaN payloads
in ways not worth copying) and only the mask from C.

The library is built with the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``) into
``$HF_HELU_CACHE_DIR`` (default ``~/.cache/hf_helu``) once per source version, in well under a
second. Without a compiler :func:`available` is False and HeLU uses the NumPy or torch backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

CACHE_ENV_VAR = "HF_HELU_CACHE_DIR"
_CFLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC")
_HALF_INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HELU_X86 1
#else
#define HELU_X86 0
#endif

/* Element i owns bit (i % 8) of bits[i / 8]; the bit is set where !(x <= thr), so NaN passes. */

#define HELU_FWD_PLAIN(NAME, T)                                                              \
static void NAME(const T *x, T thr, T *y, uint8_t *bits, int64_t i, int64_t n) {              \
    for (; i < n; i += 8) {                                                                  \
        int64_t end = i + 8 < n ? i + 8 : n;                                                 \
        uint8_t b = 0;                                                                       \
        for (int64_t k = i; k < end; k++) {                                                  \
            T v = x[k];                                                                      \
            b |= (uint8_t)(!(v <= thr)) << (k - i);                                          \
            y[k] = v < 0 ? (T)0 : v;                                                         \
        }                                                                                    \
        bits[i >> 3] = b;                                                                    \
    }                                                                                        \
}
HELU_FWD_PLAIN(fwd_f32_plain, float)
HELU_FWD_PLAIN(fwd_f64_plain, double)

/* 16-bit floats compared through an integer key with the same order as the float values. */
static inline int32_t half_key(uint16_t h) { return (h & 0x8000) ? -(int32_t)(h & 0x7FFF) : (int32_t)h; }

static void pack_h16_plain(const uint16_t *x, int16_t kthr, int16_t inf, uint8_t *bits, int64_t i, int64_t n) {
    for (; i < n; i += 8) {
        int64_t end = i + 8 < n ? i + 8 : n;
        uint8_t b = 0;
        for (int64_t k = i; k < end; k++) {
            int keep = (x[k] & 0x7FFF) > inf || half_key(x[k]) > kthr;
            b |= (uint8_t)keep << (k - i);
        }
        bits[i >> 3] = b;
    }
}

#define HELU_BWD_PLAIN(NAME, T)                                                              \
static void NAME(const T *g, const uint8_t *bits, T *out, int64_t i, int64_t n) {             \
    for (; i < n; i++) out[i] = g[i] & ((T)0 - (T)((bits[i >> 3] >> (i & 7)) & 1));           \
}
HELU_BWD_PLAIN(bwd_u16_plain, uint16_t)
HELU_BWD_PLAIN(bwd_u32_plain, uint32_t)
HELU_BWD_PLAIN(bwd_u64_plain, uint64_t)

#if HELU_X86
#define AVX2 __attribute__((target("avx2")))
static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return cached;
}

AVX2 static int64_t fwd_f32_avx2(const float *x, float thr, float *y, uint8_t *bits, int64_t n) {
    const __m256 t = _mm256_set1_ps(thr), zero = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        bits[i >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_NLE_UQ));
        _mm256_storeu_ps(y + i, _mm256_andnot_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ), v));
    }
    return i;
}

AVX2 static int64_t fwd_f64_avx2(const double *x, double thr, double *y, uint8_t *bits, int64_t n) {
    const __m256d t = _mm256_set1_pd(thr), zero = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256d a = _mm256_loadu_pd(x + i), b = _mm256_loadu_pd(x + i + 4);
        int lo = _mm256_movemask_pd(_mm256_cmp_pd(a, t, _CMP_NLE_UQ));
        int hi = _mm256_movemask_pd(_mm256_cmp_pd(b, t, _CMP_NLE_UQ));
        bits[i >> 3] = (uint8_t)(lo | (hi << 4));
        _mm256_storeu_pd(y + i, _mm256_andnot_pd(_mm256_cmp_pd(a, zero, _CMP_LT_OQ), a));
        _mm256_storeu_pd(y + i + 4, _mm256_andnot_pd(_mm256_cmp_pd(b, zero, _CMP_LT_OQ), b));
    }
    return i;
}

AVX2 static int64_t pack_h16_avx2(const uint16_t *x, int16_t kthr, int16_t inf, uint8_t *bits, int64_t n) {
    const __m256i magmask = _mm256_set1_epi16(0x7FFF), kt = _mm256_set1_epi16(kthr), ki = _mm256_set1_epi16(inf);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(x + i));
        __m256i mag = _mm256_and_si256(h, magmask);
        __m256i sign = _mm256_srai_epi16(h, 15);
        __m256i key = _mm256_sub_epi16(_mm256_xor_si256(mag, sign), sign);
        __m256i keep = _mm256_or_si256(_mm256_cmpgt_epi16(mag, ki), _mm256_cmpgt_epi16(key, kt));
        __m128i packed = _mm_packs_epi16(_mm256_castsi256_si128(keep), _mm256_extracti128_si256(keep, 1));
        uint16_t m = (uint16_t)_mm_movemask_epi8(packed);
        memcpy(bits + (i >> 3), &m, 2);
    }
    return i;
}

AVX2 static int64_t bwd_u16_avx2(const uint16_t *g, const uint8_t *bits, uint16_t *out, int64_t n) {
    const __m256i sel = _mm256_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                                          (short)0x8000);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        uint16_t b;
        memcpy(&b, bits + (i >> 3), 2);
        __m256i m = _mm256_cmpeq_epi16(_mm256_and_si256(_mm256_set1_epi16((short)b), sel), sel);
        __m256i v = _mm256_loadu_si256((const __m256i *)(g + i));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_and_si256(m, v));
    }
    return i;
}

AVX2 static int64_t bwd_u32_avx2(const uint32_t *g, const uint8_t *bits, uint32_t *out, int64_t n) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits[i >> 3]), sel), sel);
        __m256i v = _mm256_loadu_si256((const __m256i *)(g + i));
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_and_si256(m, v));
    }
    return i;
}

AVX2 static int64_t bwd_u64_avx2(const uint64_t *g, const uint8_t *bits, uint64_t *out, int64_t n) {
    const __m256i lo = _mm256_setr_epi64x(1, 2, 4, 8), hi = _mm256_setr_epi64x(16, 32, 64, 128);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i b = _mm256_set1_epi64x(bits[i >> 3]);
        __m256i ma = _mm256_cmpeq_epi64(_mm256_and_si256(b, lo), lo);
        __m256i mb = _mm256_cmpeq_epi64(_mm256_and_si256(b, hi), hi);
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_and_si256(ma, _mm256_loadu_si256((const __m256i *)(g + i))));
        _mm256_storeu_si256((__m256i *)(out + i + 4),
                            _mm256_and_si256(mb, _mm256_loadu_si256((const __m256i *)(g + i + 4))));
    }
    return i;
}
#define FAST(call) (has_avx2() ? (call) : 0)
#else
#define FAST(call) 0
#endif

void helu_forward_f32(const float *x, float thr, float *y, uint8_t *bits, int64_t n) {
    fwd_f32_plain(x, thr, y, bits, FAST(fwd_f32_avx2(x, thr, y, bits, n)), n);
}
void helu_forward_f64(const double *x, double thr, double *y, uint8_t *bits, int64_t n) {
    fwd_f64_plain(x, thr, y, bits, FAST(fwd_f64_avx2(x, thr, y, bits, n)), n);
}
void helu_pack_h16(const uint16_t *x, int16_t kthr, int16_t inf, uint8_t *bits, int64_t n) {
    pack_h16_plain(x, kthr, inf, bits, FAST(pack_h16_avx2(x, kthr, inf, bits, n)), n);
}
void helu_backward_u16(const uint16_t *g, const uint8_t *bits, uint16_t *out, int64_t n) {
    bwd_u16_plain(g, bits, out, FAST(bwd_u16_avx2(g, bits, out, n)), n);
}
void helu_backward_u32(const uint32_t *g, const uint8_t *bits, uint32_t *out, int64_t n) {
    bwd_u32_plain(g, bits, out, FAST(bwd_u32_avx2(g, bits, out, n)), n);
}
void helu_backward_u64(const uint64_t *g, const uint8_t *bits, uint64_t *out, int64_t n) {
    bwd_u64_plain(g, bits, out, FAST(bwd_u64_avx2(g, bits, out, n)), n);
}
"""

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "helu_forward_f32": [_P, ctypes.c_float, _P, _P, _I64],
    "helu_forward_f64": [_P, ctypes.c_double, _P, _P, _I64],
    "helu_pack_h16": [_P, ctypes.c_int16, ctypes.c_int16, _P, _I64],
    "helu_backward_u16": [_P, _P, _P, _I64],
    "helu_backward_u32": [_P, _P, _P, _I64],
    "helu_backward_u64": [_P, _P, _P, _I64],
}
_BACKWARD_BY_SIZE = {2: "helu_backward_u16", 4: "helu_backward_u32", 8: "helu_backward_u64"}

_library: ctypes.CDLL | None = None
_failure: str | None = None


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((path for name in ("cc", "gcc", "clang") if (path := shutil.which(name))), None)


def library_path(compiler: str) -> Path:
    """Where the library built from this source by ``compiler`` is cached."""
    root = os.environ.get(CACHE_ENV_VAR) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_helu"
    key = "\0".join((SOURCE, *_CFLAGS, compiler, platform.system(), platform.machine()))
    return Path(root) / f"helu_cpu_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(compiler: str, path: Path) -> None:
    """Compile into a temp folder beside ``path`` and rename into place: never a half-written library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        source, target = Path(tmp) / "helu_cpu.c", Path(tmp) / path.name
        source.write_text(SOURCE)
        done = subprocess.run(
            [compiler, *_CFLAGS, "-o", str(target), str(source)], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed to build the HeLU CPU kernels:\n{done.stderr[-2000:]}")
        os.replace(target, path)


def load() -> ctypes.CDLL:
    """The compiled kernels (built and cached on first call); raises RuntimeError saying why not."""
    global _library, _failure
    if _library is not None:
        return _library
    if _failure is not None:
        raise RuntimeError(_failure)
    try:
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
        path = library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _failure = f"HeLU CPU kernels unavailable: {error}"
        raise RuntimeError(_failure) from error
    _library = lib
    return lib


def available() -> bool:
    """True when the kernels are (or can be) compiled and loaded on this machine."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def _half_key(value: int) -> int:
    return -(value & 0x7FFF) if value & 0x8000 else value


# Below this many elements per thread, handing work to another thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 16
_executor: ThreadPoolExecutor | None = None


def _in_chunks(launch: Callable[[int, int], None], n: int) -> None:
    """Run ``launch(start, count)`` over ``n`` elements on up to ``torch.get_num_threads()`` threads.

    Chunks start at multiples of 8, so each owns whole mask bytes; ctypes releases the GIL during each call.
    """
    global _executor
    workers = min(torch.get_num_threads(), n // _MIN_ELEMENTS_PER_THREAD)
    if workers <= 1:
        launch(0, n)
        return
    step = -(-n // workers)
    step += -step % 8
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="hf_helu")
    futures = [_executor.submit(launch, start, min(step, n - start)) for start in range(step, n, step)]
    launch(0, step)
    for future in futures:
        future.result()


def helu_forward(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), bits)`` for a CPU tensor; bits hold ``not (x <= threshold)``, 8 per byte."""
    lib = load()
    x = x.detach().contiguous()
    n, size = x.numel(), x.element_size()
    bits = torch.empty((n + 7) // 8, dtype=torch.uint8)
    xp, bp = x.data_ptr(), bits.data_ptr()
    if x.dtype in _HALF_INF_BITS:
        y = torch.relu(x)
        raw = torch.tensor(threshold, dtype=x.dtype).view(torch.int16).item() & 0xFFFF
        key, inf = _half_key(raw), _HALF_INF_BITS[x.dtype]
        _in_chunks(lambda i, k: lib.helu_pack_h16(xp + i * size, key, inf, bp + i // 8, k), n)
        return y, bits
    y = torch.empty_like(x)
    yp = y.data_ptr()
    forward = lib.helu_forward_f32 if x.dtype == torch.float32 else lib.helu_forward_f64
    _in_chunks(lambda i, k: forward(xp + i * size, threshold, yp + i * size, bp + i // 8, k), n)
    return y, bits


def helu_backward(grad: torch.Tensor, bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``grad`` where the mask bit is set, else +0.0, shaped ``shape``."""
    grad = grad.contiguous()
    out = torch.empty(shape, dtype=grad.dtype)
    size = grad.element_size()
    backward = getattr(load(), _BACKWARD_BY_SIZE[size])
    gp, bp, op = grad.data_ptr(), bits.data_ptr(), out.data_ptr()
    _in_chunks(lambda i, k: backward(gp + i * size, bp + i // 8, op + i * size, k), grad.numel())
    return out
