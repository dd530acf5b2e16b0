/* A ReLU FFN over its active units only: the fused CPU kernel of hf_helu.sparse_inference.

   Built on first use by hf_helu/sparse/kernel.py (same compiler, flags and checksum-verified cache as the HeLU
   kernels) and loaded with ctypes; the exported functions and their signatures are listed there.

   For rows r < R, units j < m:
       a[r,j] = relu(A[j] . x[r] + bA[j])                         A: [m, d], one contiguous row per unit
       h[r,j] = a[r,j] * (B ? B[j] . x[r] + bB[j] : 1)            B: [m, d] (the up projection of a gated FFN)
       out[r] = bD + sum over j with a[r,j] != 0 of h[r,j] * D[j] D: [m, dout], the down projection transposed
   Phase 1 reads all of A (the dense gate); phase 2 reads row j of B and of D only for units active in some
   row; the return value counts those units (the rows of B and D read).

   Work split: the units are cut into sparse_ffn_chunks(m) contiguous chunks, a count fixed by m alone. The
   caller and the workers of a passive thread pool (below; no OpenMP) take chunks one at a time, so a thread
   descheduled by another process holds up at most the chunk it took; each chunk sums into its own accumulator,
   and the accumulators are added in chunk order. A result therefore depends only on the inputs, never on the
   thread count or on any OpenMP setting. Accumulation is in float32 for both dtypes. */

#define _GNU_SOURCE /* pthread_setname_np, before any system header */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SF_X86 1
#else
#define SF_X86 0
#endif

#define SF_MAX_ROWS 64
#define SF_UNITS_PER_CHUNK 64 /* fewest units worth a chunk (and a thread) of their own */
#define SF_MAX_CHUNKS 16

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f32_to_bf16(float f) { /* round to nearest even, as torch does; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (bf16)((u >> 16) | 0x40);
    return (bf16)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* ---- plain loops (any CPU) ---- */
static float dot_f32_plain(const float *w, const float *x, int64_t d) {
    float s = 0.0f;
    for (int64_t k = 0; k < d; k++) s += w[k] * x[k];
    return s;
}
static float dot_bf16_plain(const bf16 *w, const float *x, int64_t d) {
    float s = 0.0f;
    for (int64_t k = 0; k < d; k++) s += bf16_to_f32(w[k]) * x[k];
    return s;
}
static void axpy_f32_plain(float h, const float *w, float *acc, int64_t d) {
    for (int64_t k = 0; k < d; k++) acc[k] += h * w[k];
}
static void axpy_bf16_plain(float h, const bf16 *w, float *acc, int64_t d) {
    for (int64_t k = 0; k < d; k++) acc[k] += h * bf16_to_f32(w[k]);
}

/* ---- AVX2 + FMA (chosen at run time) ---- */
#if SF_X86
#define SF_AVX2 __attribute__((target("avx2,fma")))
static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
}
SF_AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
SF_AVX2 static inline __m256 load_bf16(const bf16 *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
SF_AVX2 static float dot_f32_avx2(const float *w, const float *x, int64_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), s3);
    }
    for (; k + 8 <= d; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), s0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; k < d; k++) s += w[k] * x[k];
    return s;
}
SF_AVX2 static float dot_bf16_avx2(const bf16 *w, const float *x, int64_t d) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 32 <= d; k += 32) {
        s0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(x + k), s0);
        s1 = _mm256_fmadd_ps(load_bf16(w + k + 8), _mm256_loadu_ps(x + k + 8), s1);
        s2 = _mm256_fmadd_ps(load_bf16(w + k + 16), _mm256_loadu_ps(x + k + 16), s2);
        s3 = _mm256_fmadd_ps(load_bf16(w + k + 24), _mm256_loadu_ps(x + k + 24), s3);
    }
    for (; k + 8 <= d; k += 8) s0 = _mm256_fmadd_ps(load_bf16(w + k), _mm256_loadu_ps(x + k), s0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; k < d; k++) s += bf16_to_f32(w[k]) * x[k];
    return s;
}
SF_AVX2 static void axpy_f32_avx2(float h, const float *w, float *acc, int64_t d) {
    const __m256 hv = _mm256_set1_ps(h);
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        _mm256_storeu_ps(acc + k, _mm256_fmadd_ps(hv, _mm256_loadu_ps(w + k), _mm256_loadu_ps(acc + k)));
    for (; k < d; k++) acc[k] += h * w[k];
}
SF_AVX2 static void axpy_bf16_avx2(float h, const bf16 *w, float *acc, int64_t d) {
    const __m256 hv = _mm256_set1_ps(h);
    int64_t k = 0;
    for (; k + 8 <= d; k += 8)
        _mm256_storeu_ps(acc + k, _mm256_fmadd_ps(hv, load_bf16(w + k), _mm256_loadu_ps(acc + k)));
    for (; k < d; k++) acc[k] += h * bf16_to_f32(w[k]);
}
static float dot_f32(const float *w, const float *x, int64_t d) {
    return has_avx2() ? dot_f32_avx2(w, x, d) : dot_f32_plain(w, x, d);
}
static float dot_bf16(const bf16 *w, const float *x, int64_t d) {
    return has_avx2() ? dot_bf16_avx2(w, x, d) : dot_bf16_plain(w, x, d);
}
static void axpy_f32(float h, const float *w, float *acc, int64_t d) {
    if (has_avx2()) axpy_f32_avx2(h, w, acc, d); else axpy_f32_plain(h, w, acc, d);
}
static void axpy_bf16(float h, const bf16 *w, float *acc, int64_t d) {
    if (has_avx2()) axpy_bf16_avx2(h, w, acc, d); else axpy_bf16_plain(h, w, acc, d);
}
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define dot_f32 dot_f32_plain
#define dot_bf16 dot_bf16_plain
#define axpy_f32 axpy_f32_plain
#define axpy_bf16 axpy_bf16_plain
#define PREFETCH(p) __builtin_prefetch(p)
#endif

static void prefetch_row(const void *row, int64_t bytes) {
    const char *p = (const char *)row;
    for (int64_t k = 0; k < bytes; k += 64) PREFETCH(p + k);
}

/* One chunk: units [j0, j1) for all rows, into acc [rows, dout]; `a` holds [rows, j1 - j0] gate
   values (scratch); weights are T (float or bf16), x is float [rows, d]. Returns the number of units active in at least one row. */
#define SF_CHUNK(NAME, T, DOT, AXPY)                                                                      \
static int64_t NAME(const float *x, int64_t rows, int64_t d, int64_t dout, const T *A, const T *bA,        \
                    const T *B, const T *bB, const T *D, int64_t j0, int64_t j1, float *a, float *acc) {   \
    int64_t n = j1 - j0, active = 0;                                                                      \
    for (int64_t j = j0; j < j1; j++)                                                                     \
        for (int64_t r = 0; r < rows; r++) {                                                              \
            float g = DOT(A + j * d, x + r * d, d) + (bA ? ELEM(bA[j]) : 0.0f);                           \
            a[r * n + (j - j0)] = (g <= 0.0f) ? 0.0f : g; /* NaN kept, as torch.relu keeps it */           \
        }                                                                                                 \
    int64_t next = -1;                                                                                    \
    for (int64_t j = j0; j < j1; j = next) {                                                              \
        int any = 0;                                                                                      \
        for (int64_t r = 0; r < rows; r++) any |= a[r * n + (j - j0)] != 0.0f;                            \
        for (next = j + 1; next < j1; next++) {                                                           \
            int more = 0;                                                                                 \
            for (int64_t r = 0; r < rows; r++) more |= a[r * n + (next - j0)] != 0.0f;                    \
            if (more) break;                                                                              \
        }                                                                                                 \
        if (!any) continue;                                                                               \
        active++;                                                                                         \
        if (next < j1) { /* the next active unit's rows: their addresses are known, fetch them early */    \
            if (B) prefetch_row(B + next * d, d * (int64_t)sizeof(T));                                    \
            prefetch_row(D + next * dout, dout * (int64_t)sizeof(T));                                     \
        }                                                                                                 \
        for (int64_t r = 0; r < rows; r++) {                                                              \
            float h = a[r * n + (j - j0)];                                                                \
            if (h == 0.0f) continue;                                                                      \
            if (B) h *= DOT(B + j * d, x + r * d, d) + (bB ? ELEM(bB[j]) : 0.0f);                         \
            AXPY(h, D + j * dout, acc + r * dout, dout);                                                  \
        }                                                                                                 \
    }                                                                                                     \
    return active;                                                                                        \
}
#define ELEM(v) (v)
SF_CHUNK(chunk_f32, float, dot_f32, axpy_f32)
#undef ELEM
#define ELEM(v) bf16_to_f32(v)
SF_CHUNK(chunk_bf16, bf16, dot_bf16, axpy_bf16)
#undef ELEM

/* How many chunks the m units are cut into (each gets its own accumulator): at most SF_MAX_CHUNKS, at least
   SF_UNITS_PER_CHUNK units each. */
int64_t sparse_ffn_chunks(int64_t m) {
    int64_t chunks = (m + SF_UNITS_PER_CHUNK - 1) / SF_UNITS_PER_CHUNK;
    return chunks > SF_MAX_CHUNKS ? SF_MAX_CHUNKS : (chunks < 1 ? 1 : chunks);
}

/* ---- A passive thread pool ----
   Why not OpenMP: libgomp's threads spin-wait after each parallel region (OMP_WAIT_POLICY=active is its
   default under PyTorch), so beside another busy process a decode step's 30 short kernel calls leave a spinning
   thread that takes CPU time from the main thread and from the neighbour: measured 0.75x dense, against 1.34x
   with OMP_WAIT_POLICY=passive (BENCHMARKS.md, "Sparse FFN"). Here the workers sleep on a condition variable
   between calls, and the caller never waits for a worker to arrive: it takes items itself, a worker that wakes
   late finds none left, and the caller waits only for items a worker has already taken. Items are claimed with
   one 64-bit ticket (the job's generation above, the next item below), so a late worker cannot take an item of
   a newer job. One job at a time (call_lock); a forked child starts with no workers. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#define SF_MAX_WORKERS 63
#define SF_WORKER_NAME "hf_helu-sparse"

typedef void (*sf_task)(const void *ctx, int64_t item);

static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t pool_wake = PTHREAD_COND_INITIALIZER;
static int pool_started, pool_forked_handler; /* workers started; pthread_atfork registered */
static int pool_helpers;                      /* workers the current job may use (ids below it) */
static uint32_t pool_generation;              /* the current job, bumped under pool_lock */
static sf_task pool_task;
static const void *pool_ctx;
static int64_t pool_items;
static _Atomic uint64_t pool_ticket; /* generation << 32 | next item */
static _Atomic int64_t pool_done;    /* items of the current job finished */

static void run_items(uint32_t generation, sf_task task, const void *ctx, int64_t items) {
    for (;;) {
        uint64_t t = atomic_load_explicit(&pool_ticket, memory_order_acquire);
        int64_t item = (int64_t)(t & 0xFFFFFFFFu);
        if ((uint32_t)(t >> 32) != generation || item >= items) return;
        if (!atomic_compare_exchange_weak_explicit(&pool_ticket, &t, t + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        task(ctx, item);
        atomic_fetch_add_explicit(&pool_done, 1, memory_order_release);
    }
}

static void *pool_worker(void *arg) {
    int id = (int)(intptr_t)arg;
    uint32_t seen = 0;
#ifdef __linux__
    pthread_setname_np(pthread_self(), SF_WORKER_NAME); /* so a process listing (and the tests) can tell them */
#endif
    pthread_mutex_lock(&pool_lock);
    seen = pool_generation;
    for (;;) {
        while (pool_generation == seen) pthread_cond_wait(&pool_wake, &pool_lock);
        seen = pool_generation;
        if (id >= pool_helpers) continue;
        sf_task task = pool_task;
        const void *ctx = pool_ctx;
        int64_t items = pool_items;
        pthread_mutex_unlock(&pool_lock);
        run_items(seen, task, ctx, items);
        pthread_mutex_lock(&pool_lock);
    }
    return NULL;
}

static void pool_after_fork(void) { /* the child has this thread only */
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&pool_lock, NULL);
    pthread_cond_init(&pool_wake, NULL);
    pool_started = 0;
}

/* task(ctx, i) for every i < items, on the calling thread and at most threads - 1 workers. */
static void pool_run(sf_task task, const void *ctx, int64_t items, int threads) {
    int helpers = threads - 1 < items - 1 ? threads - 1 : (int)(items - 1);
    if (helpers > SF_MAX_WORKERS) helpers = SF_MAX_WORKERS;
    pthread_mutex_lock(&call_lock);
    pthread_mutex_lock(&pool_lock);
    if (!pool_forked_handler) pool_forked_handler = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool_started < helpers) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attr, pool_worker, (void *)(intptr_t)pool_started);
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer workers: the caller takes more items */
        pool_started++;
    }
    if (helpers > pool_started) helpers = pool_started;
    uint32_t generation = ++pool_generation;
    pool_task = task, pool_ctx = ctx, pool_items = items, pool_helpers = helpers;
    atomic_store_explicit(&pool_done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool_ticket, (uint64_t)generation << 32, memory_order_release);
    if (helpers > 0) pthread_cond_broadcast(&pool_wake);
    pthread_mutex_unlock(&pool_lock);
    run_items(generation, task, ctx, items);
    for (int spins = 0; atomic_load_explicit(&pool_done, memory_order_acquire) < items; spins++)
        if (spins > 64) sched_yield(); /* a worker is finishing an item it took */
    pthread_mutex_unlock(&call_lock);
}

/* ---- The driver: chunks on the pool, then the chunk accumulators summed in chunk order, plus bD ---- */
typedef struct {
    const float *x;
    int64_t rows, d, m, dout, per, total, stride;
    const void *A, *bA, *B, *bB, *D;
    float *scratch;
    int64_t *active; /* per chunk */
} sf_job;

#define SF_TASK(NAME, T, CHUNK)                                                                           \
static void NAME(const void *ctxv, int64_t c) {                                                           \
    const sf_job *j = (const sf_job *)ctxv;                                                               \
    int64_t j0 = c * j->per, j1 = j0 + j->per < j->m ? j0 + j->per : j->m;                                \
    float *acc = j->scratch + c * j->stride, *a = acc + j->total;                                         \
    memset(acc, 0, j->total * sizeof(float));                                                             \
    j->active[c] = j0 < j1 ? CHUNK(j->x, j->rows, j->d, j->dout, (const T *)j->A, (const T *)j->bA,       \
                                   (const T *)j->B, (const T *)j->bB, (const T *)j->D, j0, j1, a, acc)    \
                           : 0;                                                                           \
}
SF_TASK(task_f32, float, chunk_f32)
SF_TASK(task_bf16, bf16, chunk_bf16)

/* `scratch` holds sparse_ffn_chunks(m) * rows * (dout + ceil(m / chunks)) floats; at most `threads` threads. */
#define SF_DRIVER(NAME, T, TASK, BIAS, STORE)                                                             \
int64_t NAME(const void *xv, int64_t rows, int64_t d, int64_t m, int64_t dout, const T *A, const T *bA,   \
             const T *B, const T *bB, const T *D, const T *bD, void *outv, float *scratch, int threads) { \
    if (rows < 1 || rows > SF_MAX_ROWS || m < 1 || threads < 1) return -1;                                \
    int64_t chunks = sparse_ffn_chunks(m), per = (m + chunks - 1) / chunks, active[SF_MAX_CHUNKS];        \
    sf_job job = {(const float *)xv, rows, d, m, dout, per, rows * dout, rows * (dout + per),             \
                  A, bA, B, bB, D, scratch, active};                                                      \
    pool_run(TASK, &job, chunks, threads);                                                                \
    int64_t total_active = 0;                                                                             \
    for (int64_t c = 0; c < chunks; c++) total_active += active[c];                                       \
    for (int64_t i = 0; i < job.total; i++) {                                                             \
        float s = scratch[i];                                                                             \
        for (int64_t c = 1; c < chunks; c++) s += scratch[c * job.stride + i];                            \
        if (bD) s += BIAS(bD[i % dout]);                                                                  \
        STORE(outv, i, s);                                                                                \
    }                                                                                                     \
    return total_active;                                                                                  \
}
#define F32_BIAS(v) (v)
#define F32_STORE(o, i, s) (((float *)(o))[i] = (s))
#define BF16_BIAS(v) bf16_to_f32(v)
#define BF16_STORE(o, i, s) (((bf16 *)(o))[i] = f32_to_bf16(s))

/* x is float32 [rows, d] for both: a bf16 caller converts x first (exact) and gets bf16 out. */
SF_DRIVER(sparse_ffn_f32, float, task_f32, F32_BIAS, F32_STORE)
SF_DRIVER(sparse_ffn_bf16, bf16, task_bf16, BF16_BIAS, BF16_STORE)
