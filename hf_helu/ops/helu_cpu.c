/* HeLU's fused CPU kernels: one pass each way with a bit-packed mask.

   Built on first use by hf_helu/ops/cpu.py with the system C compiler (with -fopenmp when it can) and
   cached under a name that hashes this text, so an edit here is picked up by the next load. The exported
   functions and their ctypes signatures are listed in cpu.py (_SIGNATURES); HELU_GRAIN comes from there too.

     forward:   read x once, write y = relu(x) and bits (bit i%8 of byte i/8 = !(x[i] <= thr))
     backward:  read grad and bits once, write grad_in = grad where the bit is set, else +0.0 */

#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
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

/* y = relu(x) on the bits (negative non-zero -> +0, -0 stays -0 as in torch.relu) and the mask;
   returns whether a NaN was seen (torch.relu's NaN payloads differ between its own code paths, so
   the caller then takes y from torch.relu). */
static int fwd_h16_plain(const uint16_t *x, int16_t kthr, int16_t inf, uint16_t *y, uint8_t *bits, int64_t i,
                         int64_t n) {
    int nan = 0;
    for (; i < n; i += 8) {
        int64_t end = i + 8 < n ? i + 8 : n;
        uint8_t b = 0;
        for (int64_t k = i; k < end; k++) {
            uint16_t h = x[k], mag = h & 0x7FFF;
            nan |= mag > inf;
            b |= (uint8_t)(mag > inf || half_key(h) > kthr) << (k - i);
            y[k] = (h & 0x8000) && mag ? 0 : h;
        }
        bits[i >> 3] = b;
    }
    return nan;
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

AVX2 static int64_t fwd_h16_avx2(const uint16_t *x, int16_t kthr, int16_t inf, uint16_t *y, uint8_t *bits,
                                  int64_t n, int *nan) {
    const __m256i magmask = _mm256_set1_epi16(0x7FFF), kt = _mm256_set1_epi16(kthr), ki = _mm256_set1_epi16(inf);
    const __m256i zero = _mm256_setzero_si256();
    __m256i nans = zero;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(x + i));
        __m256i mag = _mm256_and_si256(h, magmask);
        __m256i sign = _mm256_srai_epi16(h, 15);
        __m256i key = _mm256_sub_epi16(_mm256_xor_si256(mag, sign), sign);
        __m256i is_nan = _mm256_cmpgt_epi16(mag, ki);
        __m256i keep = _mm256_or_si256(is_nan, _mm256_cmpgt_epi16(key, kt));
        __m128i packed = _mm_packs_epi16(_mm256_castsi256_si128(keep), _mm256_extracti128_si256(keep, 1));
        uint16_t m = (uint16_t)_mm_movemask_epi8(packed);
        memcpy(bits + (i >> 3), &m, 2);
        __m256i negative = _mm256_andnot_si256(_mm256_cmpeq_epi16(mag, zero), sign); /* sign set, not +-0 */
        _mm256_storeu_si256((__m256i *)(y + i), _mm256_andnot_si256(negative, h));
        nans = _mm256_or_si256(nans, is_nan);
    }
    *nan |= !_mm256_testz_si256(nans, nans);
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

/* Run BODY over [0, n) in pieces [lo, lo + len) of HELU_GRAIN elements (a multiple of 8, so each piece owns
   whole mask bytes). With OpenMP the pieces go, one at a time, to whichever threads of the process's OpenMP team
   (PyTorch's own, when it is loaded) actually run, at most `threads` of them and at least HELU_GRAIN elements each:
   a thread descheduled by another process holds up one piece, not a fixed share of the tensor. */
#define HELU_TEAM(n, threads) ((threads) < (n) / HELU_GRAIN ? (threads) : (int)((n) / HELU_GRAIN))
#ifdef _OPENMP
#define FOR_CHUNKS(n, threads, ...) do {                                                         \
    int team_ = HELU_TEAM(n, threads);                                                           \
    if (team_ <= 1) { int64_t lo = 0, len = (n); __VA_ARGS__; break; }                           \
    int64_t pieces_ = ((n) + HELU_GRAIN - 1) / HELU_GRAIN;                                       \
    _Pragma("omp parallel for num_threads(team_) schedule(dynamic, 1)")                          \
    for (int64_t p_ = 0; p_ < pieces_; p_++) {                                                   \
        int64_t lo = p_ * (int64_t)HELU_GRAIN;                                                   \
        int64_t len = (n) - lo < HELU_GRAIN ? (n) - lo : HELU_GRAIN;                             \
        __VA_ARGS__;                                                                             \
    }                                                                                            \
} while (0)
#else
#define FOR_CHUNKS(n, threads, ...) do { int64_t lo = 0, len = (n); (void)(threads); __VA_ARGS__; } while (0)
#endif

static void fwd_f32(const float *x, float thr, float *y, uint8_t *bits, int64_t n) {
    fwd_f32_plain(x, thr, y, bits, FAST(fwd_f32_avx2(x, thr, y, bits, n)), n);
}
static void fwd_f64(const double *x, double thr, double *y, uint8_t *bits, int64_t n) {
    fwd_f64_plain(x, thr, y, bits, FAST(fwd_f64_avx2(x, thr, y, bits, n)), n);
}
static int fwd_h16(const uint16_t *x, int16_t kthr, int16_t inf, uint16_t *y, uint8_t *bits, int64_t n) {
    int nan = 0;
    int64_t done = FAST(fwd_h16_avx2(x, kthr, inf, y, bits, n, &nan));
    return fwd_h16_plain(x, kthr, inf, y, bits, done, n) | nan;
}
static void bwd_u16(const uint16_t *g, const uint8_t *bits, uint16_t *out, int64_t n) {
    bwd_u16_plain(g, bits, out, FAST(bwd_u16_avx2(g, bits, out, n)), n);
}
static void bwd_u32(const uint32_t *g, const uint8_t *bits, uint32_t *out, int64_t n) {
    bwd_u32_plain(g, bits, out, FAST(bwd_u32_avx2(g, bits, out, n)), n);
}
static void bwd_u64(const uint64_t *g, const uint8_t *bits, uint64_t *out, int64_t n) {
    bwd_u64_plain(g, bits, out, FAST(bwd_u64_avx2(g, bits, out, n)), n);
}

void helu_forward_f32(const float *x, float thr, float *y, uint8_t *bits, int64_t n, int threads) {
    FOR_CHUNKS(n, threads, fwd_f32(x + lo, thr, y + lo, bits + lo / 8, len));
}
void helu_forward_f64(const double *x, double thr, double *y, uint8_t *bits, int64_t n, int threads) {
    FOR_CHUNKS(n, threads, fwd_f64(x + lo, thr, y + lo, bits + lo / 8, len));
}
int helu_forward_h16(const uint16_t *x, int16_t kthr, int16_t inf, uint16_t *y, uint8_t *bits, int64_t n,
                     int threads) {
    int nan = 0;
    FOR_CHUNKS(n, threads, if (fwd_h16(x + lo, kthr, inf, y + lo, bits + lo / 8, len))
                               __atomic_store_n(&nan, 1, __ATOMIC_RELAXED));
    return nan;
}
void helu_backward_u16(const uint16_t *g, const uint8_t *bits, uint16_t *out, int64_t n, int threads) {
    FOR_CHUNKS(n, threads, bwd_u16(g + lo, bits + lo / 8, out + lo, len));
}
void helu_backward_u32(const uint32_t *g, const uint8_t *bits, uint32_t *out, int64_t n, int threads) {
    FOR_CHUNKS(n, threads, bwd_u32(g + lo, bits + lo / 8, out + lo, len));
}
void helu_backward_u64(const uint64_t *g, const uint8_t *bits, uint64_t *out, int64_t n, int threads) {
    FOR_CHUNKS(n, threads, bwd_u64(g + lo, bits + lo / 8, out + lo, len));
}

/* At most how many threads FOR_CHUNKS runs for n elements (tests check the split with this). */
int helu_team_size(int64_t n, int threads) {
#ifdef _OPENMP
    int team = HELU_TEAM(n, threads);
    return team < 1 ? 1 : team;
#else
    (void)n;
    (void)threads;
    return 1;
#endif
}
