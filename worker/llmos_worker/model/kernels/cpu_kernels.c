/* CPU kernels of the worker, fp32: paged decode and prefill attention, the per-layer ops, the
 * linear layers and the whole decoder stack of a step.
 *
 * The per-layer ops (residual add + RMSNorm, rotary embedding in place, SiLU(gate) * up) each
 * replace several torch ops whose dispatch cost dominates a small decode step.
 *
 * Paged decode attention: one query token per sequence, K/V read in place.
 *
 * The torch path gathers every sequence's blocks into a padded copy before attending; this
 * kernel walks each sequence's block table and reads K/V rows where they lie in the cache, once.
 * Work items are (sequence, KV head) pairs, spread over OpenMP threads; the GQA query heads that
 * share a KV head are scored together so each K/V row is loaded once for all of them.
 * Softmax is exact (two passes over the scores: max, then exp-sum), as in SDPA.
 *
 * Layouts (all row-major, contiguous):
 *   q             (T, H, D) with `q_stride` floats between rows (a slice of the fused QKV)
 *   out           (T, H, D) contiguous; sequence s reads q row rows[s] and writes out row rows[s]
 *   k_cache, v_cache  (num_blocks, block_size, Hkv, D) of one layer, fp32 or (kv_half) fp16
 *   block_tables  (S, max_blocks) int64, ids < num_blocks; context_lens (S,) int64 (>= 1)
 *   rows          (S,) int64, each < num_rows (the T of q and out)
 * Returns 0, or a non-zero status (nothing computed) when the inputs are inconsistent (8: an
 * fp16 cache on a build without F16C).
 *
 * Built by llmos_worker/model/kernels/__init__.py with `cc -O3 -fopenmp -shared`; the OpenMP
 * runtime it links (libgomp.so.1) is the one torch already loaded, so both share one thread pool.
 */
/* why: under -std=c11, unistd.h declares syscall() (the AMX permission request) only with this */
#define _DEFAULT_SOURCE
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define MAX_GROUP 16 /* query heads per KV head handled in one item (GQA ratio) */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMOS_AVX2 1

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp for x in [-87, 88] (clamped outside): Cephes' expf polynomial, ~1 ulp */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f),
                                                _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}
#endif

#if defined(LLMOS_AVX2) && defined(__F16C__)
/* fp16 KV caches (opt-in): rows are widened to fp32 as they are read, narrowed when written */
#define LLMOS_KV_HALF 1
static inline __m256 load_half8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* dst (n) = src (n) widened */
static inline void widen_half(float *dst, const uint16_t *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_half8(src + i));
    for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

/* dst (n) = src (n) rounded to the nearest fp16 */
static inline void narrow_half(uint16_t *dst, const float *src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}
#endif

int llmos_kv_half_supported(void) {
#ifdef LLMOS_KV_HALF
    return 1;
#else
    return 0;
#endif
}

/* out[i] = q . x[i * stride : i * stride + d] for i < n (the rows of one block) */
static inline void row_dots(float *out, const float *q, const float *x, int64_t stride, int64_t n,
                            int64_t d) {
#ifdef LLMOS_AVX2
    if (d == 64) { /* why: q stays in 8 registers across the block's rows */
        const __m256 q0 = _mm256_loadu_ps(q), q1 = _mm256_loadu_ps(q + 8);
        const __m256 q2 = _mm256_loadu_ps(q + 16), q3 = _mm256_loadu_ps(q + 24);
        const __m256 q4 = _mm256_loadu_ps(q + 32), q5 = _mm256_loadu_ps(q + 40);
        const __m256 q6 = _mm256_loadu_ps(q + 48), q7 = _mm256_loadu_ps(q + 56);
        for (int64_t i = 0; i < n; ++i, x += stride) {
            __m256 s0 = _mm256_mul_ps(q0, _mm256_loadu_ps(x));
            __m256 s1 = _mm256_mul_ps(q1, _mm256_loadu_ps(x + 8));
            s0 = _mm256_fmadd_ps(q2, _mm256_loadu_ps(x + 16), s0);
            s1 = _mm256_fmadd_ps(q3, _mm256_loadu_ps(x + 24), s1);
            s0 = _mm256_fmadd_ps(q4, _mm256_loadu_ps(x + 32), s0);
            s1 = _mm256_fmadd_ps(q5, _mm256_loadu_ps(x + 40), s1);
            s0 = _mm256_fmadd_ps(q6, _mm256_loadu_ps(x + 48), s0);
            s1 = _mm256_fmadd_ps(q7, _mm256_loadu_ps(x + 56), s1);
            out[i] = hsum8(_mm256_add_ps(s0, s1));
        }
        return;
    }
#endif
    for (int64_t i = 0; i < n; ++i, x += stride) {
        float s = 0.0f;
        for (int64_t j = 0; j < d; ++j) s += q[j] * x[j];
        out[i] = s;
    }
}

/* y (d) += sum_i p[i] * x[i * stride : i * stride + d] for i < n (the rows of one block) */
static inline void weighted_rows(float *y, const float *p, const float *x, int64_t stride,
                                 int64_t n, int64_t d) {
#ifdef LLMOS_AVX2
    if (d == 64) { /* why: 8 accumulators stay in registers across the block's rows */
        __m256 a0 = _mm256_loadu_ps(y), a1 = _mm256_loadu_ps(y + 8);
        __m256 a2 = _mm256_loadu_ps(y + 16), a3 = _mm256_loadu_ps(y + 24);
        __m256 a4 = _mm256_loadu_ps(y + 32), a5 = _mm256_loadu_ps(y + 40);
        __m256 a6 = _mm256_loadu_ps(y + 48), a7 = _mm256_loadu_ps(y + 56);
        for (int64_t i = 0; i < n; ++i, x += stride) {
            const __m256 pv = _mm256_set1_ps(p[i]);
            a0 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x), a0);
            a1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + 8), a1);
            a2 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + 16), a2);
            a3 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + 24), a3);
            a4 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + 32), a4);
            a5 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + 40), a5);
            a6 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + 48), a6);
            a7 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + 56), a7);
        }
        _mm256_storeu_ps(y, a0), _mm256_storeu_ps(y + 8, a1);
        _mm256_storeu_ps(y + 16, a2), _mm256_storeu_ps(y + 24, a3);
        _mm256_storeu_ps(y + 32, a4), _mm256_storeu_ps(y + 40, a5);
        _mm256_storeu_ps(y + 48, a6), _mm256_storeu_ps(y + 56, a7);
        return;
    }
#endif
    for (int64_t i = 0; i < n; ++i, x += stride)
        for (int64_t j = 0; j < d; ++j) y[j] += p[i] * x[j];
}

#if defined(LLMOS_AVX2) && defined(__AVX512F__)
/* 512-bit decode attention for head_dim 64 and up to 4 query heads per KV head: a K or V row is
 * 4 zmm, loaded once for all the group's heads (the 256-bit path loads it once per head), with
 * the group's q (or outputs) held in registers across a span of rows. fp16 rows are widened as
 * they are loaded (HALF, a constant at each call site), with no copy through a buffer. */
#define ATT64_GROUP 4

/* chunk c (16 values) of row i of `rows` (ld elements apart), fp32 or (half) fp16 */
static inline __attribute__((always_inline)) __m512 row64_chunk(const void *rows, const int half,
                                                               int64_t i, int64_t ld, int c) {
#ifdef LLMOS_KV_HALF
    if (half)
        return _mm512_cvtph_ps(
            _mm256_loadu_si256((const __m256i *)((const uint16_t *)rows + i * ld + c * 16)));
#else
    (void)half;
#endif
    return _mm512_loadu_ps((const float *)rows + i * ld + c * 16);
}

/* scores[g * max_len + i] = (q_g . row i) * scale for rows i < n (ld elements apart); maxes[g]
 * raised to them. G: the group size, a constant at each call site. */
static inline __attribute__((always_inline)) void span_scores64(const float *q, const int G,
                                                               const void *rows, const int half,
                                                               int64_t ld,
                                                               int64_t n, float *scores,
                                                               int64_t max_len, float scale,
                                                               float *maxes) {
    __m512 qv[ATT64_GROUP][4];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) qv[g][c] = _mm512_loadu_ps(q + g * 64 + c * 16);
    for (int64_t i = 0; i < n; ++i) {
        const __m512 k0 = row64_chunk(rows, half, i, ld, 0), k1 = row64_chunk(rows, half, i, ld, 1);
        const __m512 k2 = row64_chunk(rows, half, i, ld, 2), k3 = row64_chunk(rows, half, i, ld, 3);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
            const __m512 a = _mm512_fmadd_ps(qv[g][2], k2, _mm512_mul_ps(qv[g][0], k0));
            const __m512 b = _mm512_fmadd_ps(qv[g][3], k3, _mm512_mul_ps(qv[g][1], k1));
            const float s = _mm512_reduce_add_ps(_mm512_add_ps(a, b)) * scale;
            scores[g * max_len + i] = s;
            if (s > maxes[g]) maxes[g] = s;
        }
    }
}

/* out_g (64) += sum_i p[g * max_len + i] * row i, for rows i < n (ld elements apart). */
static inline __attribute__((always_inline)) void span_weighted64(float *out, const int G,
                                                                 const float *p, int64_t max_len,
                                                                 const void *rows, const int half,
                                                                 int64_t ld, int64_t n) {
    __m512 acc[ATT64_GROUP][4];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_loadu_ps(out + g * 64 + c * 16);
    for (int64_t i = 0; i < n; ++i) {
        const __m512 v0 = row64_chunk(rows, half, i, ld, 0), v1 = row64_chunk(rows, half, i, ld, 1);
        const __m512 v2 = row64_chunk(rows, half, i, ld, 2), v3 = row64_chunk(rows, half, i, ld, 3);
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
            const __m512 w = _mm512_set1_ps(p[g * max_len + i]);
            acc[g][0] = _mm512_fmadd_ps(w, v0, acc[g][0]);
            acc[g][1] = _mm512_fmadd_ps(w, v1, acc[g][1]);
            acc[g][2] = _mm512_fmadd_ps(w, v2, acc[g][2]);
            acc[g][3] = _mm512_fmadd_ps(w, v3, acc[g][3]);
        }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + g * 64 + c * 16, acc[g][c]);
}

/* One span for the whole group (1 <= group <= ATT64_GROUP): pass 0 scores, pass 1 outputs;
 * rows fp32 or (half) fp16. */
static inline void span64(int pass, const float *q, float *out, int64_t group, const void *rows,
                          int half, int64_t ld, int64_t n, float *scores, int64_t max_len,
                          float scale, float *maxes) {
#define SPAN64_CALL(G, HALF)                                                                    \
    if (pass == 0)                                                                              \
        span_scores64(q, G, rows, HALF, ld, n, scores, max_len, scale, maxes);                  \
    else                                                                                        \
        span_weighted64(out, G, scores, max_len, rows, HALF, ld, n);
#define SPAN64_CASE(G)                                                                          \
    case G:                                                                                     \
        if (half) {                                                                             \
            SPAN64_CALL(G, 1)                                                                   \
        } else {                                                                                \
            SPAN64_CALL(G, 0)                                                                   \
        }                                                                                       \
        break;
    switch (group) {
        SPAN64_CASE(1)
        SPAN64_CASE(2)
        SPAN64_CASE(3)
        SPAN64_CASE(4)
    default: break;
    }
#undef SPAN64_CASE
#undef SPAN64_CALL
}
#endif

/* x[i] = exp(x[i] - m) for i < n; returns the sum */
static inline float exp_sum(float *x, float m, int64_t n) {
    float sum = 0.0f;
    int64_t i = 0;
#ifdef LLMOS_AVX2
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; ++i) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    return sum;
}

int llmos_max_group(void) { return MAX_GROUP; }

/* Prefetch n rows of `bytes` bytes, `stride` bytes apart, into cache. Why: blocks lie anywhere
 * in the cache, so the hardware prefetcher, which follows address streams, misses the first
 * rows of every block; the next block is fetched while this one is computed. */
static inline void prefetch_rows(const char *p, int64_t n, int64_t stride, int64_t bytes) {
    for (int64_t i = 0; i < n; ++i, p += stride)
        for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + c, 0, 3);
}

#define ROW_BUF_FLOATS 2048 /* fp16 rows widened at a time: 8 KB, in L1 */

/* Rows [t0, t0 + n) of one KV head of a paged cache as fp32 rows `*ld` floats apart: in place
 * for an fp32 cache; for an fp16 cache widened once into buf (n * head_dim <= ROW_BUF_FLOATS),
 * so the GQA heads that read them share one conversion. */
static inline const float *cache_rows(const void *cache, int half, int64_t at, int64_t kv_row,
                                      int64_t n, int64_t head_dim, float *buf, int64_t *ld) {
#ifdef LLMOS_KV_HALF
    if (half) {
        for (int64_t i = 0; i < n; ++i)
            widen_half(buf + i * head_dim, (const uint16_t *)cache + at + i * kv_row, head_dim);
        *ld = head_dim;
        return buf;
    }
#else
    (void)half, (void)n, (void)head_dim, (void)buf;
#endif
    *ld = kv_row;
    return (const float *)cache + at;
}

/* One (sequence, KV head) item: the `group` query heads at q (group * head_dim floats) attend to
 * the sequence's first `len` K/V rows through `table`; results to out (group * head_dim).
 * `scores` holds group * max_len floats of scratch. K/V rows go in spans of at most one block
 * (and at most ROW_BUF_FLOATS / head_dim rows). */
static void attend_item(const float *q, float *out, const void *k_cache, const void *v_cache,
                        int half, const int64_t *table, int64_t len, int64_t kvh, int64_t group,
                        int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                        float *scores, int64_t max_len, float scale) {
    const int64_t kv_row = num_kv_heads * head_dim; /* elements between consecutive tokens */
    const int64_t esize = half ? 2 : 4;
    int64_t span = ROW_BUF_FLOATS / head_dim;
    span = span < 1 ? 1 : span > block_size ? block_size : span;
    float buf[ROW_BUF_FLOATS];
    const int64_t spans_per_block = (block_size + span - 1) / span;
    /* pass 1: scores = q . k * scale, row maxima; pass 2: out = sum_t p_t v_t / sum_t p_t */
    float maxes[MAX_GROUP], sums[MAX_GROUP];
    for (int64_t g = 0; g < group; ++g) maxes[g] = -INFINITY;
    for (int pass = 0; pass < 2; ++pass) {
        const void *cache = pass == 0 ? k_cache : v_cache;
        /* why block by block: no integer division per token (slow on many x86 cores) */
        for (int64_t b = 0, t0 = 0; t0 < len; ++b, t0 += block_size) {
            const int64_t in_block = len - t0 < block_size ? len - t0 : block_size;
            if (t0 + block_size < len) {
                const int64_t next = len - t0 - block_size;
                prefetch_rows((const char *)cache +
                                  (table[b + 1] * block_size * num_kv_heads + kvh) * head_dim *
                                      esize,
                              next < block_size ? next : block_size, kv_row * esize,
                              head_dim * esize);
            }
            for (int64_t j = 0; j < spans_per_block && j * span < in_block; ++j) {
                const int64_t r0 = j * span, n = in_block - r0 < span ? in_block - r0 : span;
                const int64_t at = ((table[b] * block_size + r0) * num_kv_heads + kvh) * head_dim;
#if defined(LLMOS_AVX2) && defined(__AVX512F__)
                if (head_dim == 64 && group <= ATT64_GROUP) { /* rows read in place */
                    span64(pass, q, out, group, (const char *)cache + at * esize, half, kv_row,
                           n, scores + t0 + r0, max_len, scale, maxes);
                    continue;
                }
#endif
                int64_t ld;
                const float *rows = cache_rows(cache, half, at, kv_row, n, head_dim, buf, &ld);
                for (int64_t g = 0; g < group; ++g) {
                    float *sg = scores + g * max_len + t0 + r0;
                    if (pass == 0) {
                        row_dots(sg, q + g * head_dim, rows, ld, n, head_dim);
                        for (int64_t i = 0; i < n; ++i) {
                            sg[i] *= scale;
                            if (sg[i] > maxes[g]) maxes[g] = sg[i];
                        }
                    } else {
                        weighted_rows(out + g * head_dim, sg, rows, ld, n, head_dim);
                    }
                }
            }
        }
        if (pass == 0) /* softmax weights, unnormalised */
            for (int64_t g = 0; g < group; ++g) {
                sums[g] = exp_sum(scores + g * max_len, maxes[g], len);
                memset(out + g * head_dim, 0, sizeof(float) * (size_t)head_dim);
            }
    }
    for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.0f / sums[g];
        float *og = out + g * head_dim;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) og[d] *= inv;
    }
}

/* The checks both attention entry points make; 0 or the status to return. `max_len` gets the
 * longest context, `total_len` their sum. */
static int check_attention(const int64_t *block_tables, const int64_t *context_lens,
                           const int64_t *rows, int64_t num_seqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t block_size, int64_t max_blocks,
                           int64_t num_blocks, int64_t num_rows, int64_t *max_len,
                           int64_t *total_len) {
    const int64_t group = num_kv_heads > 0 ? num_heads / num_kv_heads : 0;
    if (group < 1 || group > MAX_GROUP || group * num_kv_heads != num_heads) return 1;
    *max_len = 0, *total_len = 0;
    for (int64_t s = 0; s < num_seqs; ++s) {
        if (context_lens[s] < 1 || context_lens[s] > max_blocks * block_size) return 2;
        if (context_lens[s] > *max_len) *max_len = context_lens[s];
        *total_len += context_lens[s];
    }
    for (int64_t s = 0; s < num_seqs; ++s) /* rows index q and out: (num_rows, H, D) */
        if (rows[s] < 0 || rows[s] >= num_rows) return 5;
    for (int64_t s = 0; s < num_seqs; ++s) /* why: a bad block id would read outside the cache */
        for (int64_t b = 0; b * block_size < context_lens[s]; ++b)
            if (block_tables[s * max_blocks + b] < 0 || block_tables[s * max_blocks + b] >= num_blocks)
                return 4;
    return 0;
}

int llmos_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                                 const int64_t *block_tables, const int64_t *context_lens,
                                 const int64_t *rows, float *out, int64_t q_stride,
                                 int64_t num_seqs,
                                 int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                 int64_t block_size, int64_t max_blocks, int64_t num_blocks,
                                 int64_t num_rows, float scale, int kv_half) {
    if (kv_half && !llmos_kv_half_supported()) return 8;
    int64_t max_len, total_len;
    const int status = check_attention(block_tables, context_lens, rows, num_seqs, num_heads,
                                       num_kv_heads, block_size, max_blocks, num_blocks,
                                       num_rows, &max_len, &total_len);
    if (status != 0) return status;
    const int64_t group = num_heads / num_kv_heads;
    int failed = 0;
    /* why a threshold: waking a second thread costs tens of microseconds, more than one thread
     * needs for a single short sequence */
    const int parallel = total_len * num_heads * head_dim >= (1 << 18);

#pragma omp parallel if (parallel)
    {
        /* per thread: scores (group, max_len) */
        float *scores = malloc(sizeof(float) * (size_t)(group * max_len));
        if (scores == NULL) {
#pragma omp atomic write
            failed = 3;
        }
#pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < num_seqs * num_kv_heads; ++item) {
            if (scores == NULL) continue;
            const int64_t s = item / num_kv_heads, kvh = item % num_kv_heads;
            attend_item(q + rows[s] * q_stride + kvh * group * head_dim,
                        out + (rows[s] * num_heads + kvh * group) * head_dim, k_cache, v_cache,
                        kv_half, block_tables + s * max_blocks, context_lens[s], kvh, group,
                        num_kv_heads, head_dim, block_size, scores, max_len, scale);
        }
        free(scores);
    }
    return failed;
}

/* ---------------------------------------------------------------- paged prefill attention */

/* Causal attention of prefill chunks (many query tokens of one sequence) against K/V read in
 * place through the block table: the chunk's own K/V are already in the cache. Blocked as flash
 * attention is: a work item is (chunk, KV head, tile of PF_TOKENS query tokens), whose query
 * vectors (tokens x the GQA heads of the KV head) are held transposed, so a 6-key x 16-query
 * register tile of scores takes key elements as broadcasts straight from the cache rows (no
 * copy of K). Keys go PF_KEYS at a time; the softmax runs online (a running max and sum per
 * query vector, earlier outputs rescaled when the max grows), vectorised across query vectors,
 * so nothing is materialised past one tile of scores. Keys past a token's position are masked. */

#define PF_TOKENS 16 /* query tokens per work item */
#define PF_KEYS 48   /* keys per tile of scores: a multiple of 6 (the register tile's keys) */

/* st (6, 16), rows ld apart, = the key rows k[0..5] (d floats each) . qt (d, 16), rows ld
 * apart: scores of 6 keys against 16 query vectors */
static inline void key_scores(const float *const *k, const float *qt, int64_t ld, float *st,
                              int64_t d) {
#ifdef LLMOS_AVX2
    const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3], *k4 = k[4], *k5 = k[5];
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t i = 0; i < d; ++i, qt += ld) {
        const __m256 b0 = _mm256_loadu_ps(qt), b1 = _mm256_loadu_ps(qt + 8);
        __m256 a = _mm256_broadcast_ss(k0 + i);
        c00 = _mm256_fmadd_ps(a, b0, c00), c01 = _mm256_fmadd_ps(a, b1, c01);
        a = _mm256_broadcast_ss(k1 + i);
        c10 = _mm256_fmadd_ps(a, b0, c10), c11 = _mm256_fmadd_ps(a, b1, c11);
        a = _mm256_broadcast_ss(k2 + i);
        c20 = _mm256_fmadd_ps(a, b0, c20), c21 = _mm256_fmadd_ps(a, b1, c21);
        a = _mm256_broadcast_ss(k3 + i);
        c30 = _mm256_fmadd_ps(a, b0, c30), c31 = _mm256_fmadd_ps(a, b1, c31);
        a = _mm256_broadcast_ss(k4 + i);
        c40 = _mm256_fmadd_ps(a, b0, c40), c41 = _mm256_fmadd_ps(a, b1, c41);
        a = _mm256_broadcast_ss(k5 + i);
        c50 = _mm256_fmadd_ps(a, b0, c50), c51 = _mm256_fmadd_ps(a, b1, c51);
    }
    _mm256_storeu_ps(st, c00), _mm256_storeu_ps(st + 8, c01);
    _mm256_storeu_ps(st + ld, c10), _mm256_storeu_ps(st + ld + 8, c11);
    _mm256_storeu_ps(st + 2 * ld, c20), _mm256_storeu_ps(st + 2 * ld + 8, c21);
    _mm256_storeu_ps(st + 3 * ld, c30), _mm256_storeu_ps(st + 3 * ld + 8, c31);
    _mm256_storeu_ps(st + 4 * ld, c40), _mm256_storeu_ps(st + 4 * ld + 8, c41);
    _mm256_storeu_ps(st + 5 * ld, c50), _mm256_storeu_ps(st + 5 * ld + 8, c51);
#else
    for (int64_t j = 0; j < 6; ++j)
        for (int64_t r = 0; r < 16; ++r) {
            float acc = 0.0f;
            for (int64_t i = 0; i < d; ++i) acc += k[j][i] * qt[i * ld + r];
            st[j * ld + r] = acc;
        }
#endif
}

/* o (nr, d) += p . v for nr <= 3 query vectors: p[j * ld + r] weighs key j's V row v[j]
 * (j < n) for query vector r */
static inline void weighted_tile(float *o, const float *p, int64_t ld, const float *const *v,
                                 int64_t n, int64_t d, int64_t nr) {
    int64_t c = 0;
#ifdef LLMOS_AVX2
    /* why 3 rows x 32 columns: 12 accumulators stay in registers */
    for (; nr == 3 && c + 32 <= d; c += 32) {
        float *o0 = o + c, *o1 = o + d + c, *o2 = o + 2 * d + c;
        __m256 a00 = _mm256_loadu_ps(o0), a01 = _mm256_loadu_ps(o0 + 8);
        __m256 a02 = _mm256_loadu_ps(o0 + 16), a03 = _mm256_loadu_ps(o0 + 24);
        __m256 a10 = _mm256_loadu_ps(o1), a11 = _mm256_loadu_ps(o1 + 8);
        __m256 a12 = _mm256_loadu_ps(o1 + 16), a13 = _mm256_loadu_ps(o1 + 24);
        __m256 a20 = _mm256_loadu_ps(o2), a21 = _mm256_loadu_ps(o2 + 8);
        __m256 a22 = _mm256_loadu_ps(o2 + 16), a23 = _mm256_loadu_ps(o2 + 24);
        for (int64_t j = 0; j < n; ++j) {
            const float *vj = v[j] + c, *pj = p + j * ld;
            const __m256 b0 = _mm256_loadu_ps(vj), b1 = _mm256_loadu_ps(vj + 8);
            const __m256 b2 = _mm256_loadu_ps(vj + 16), b3 = _mm256_loadu_ps(vj + 24);
            __m256 a = _mm256_broadcast_ss(pj);
            a00 = _mm256_fmadd_ps(a, b0, a00), a01 = _mm256_fmadd_ps(a, b1, a01);
            a02 = _mm256_fmadd_ps(a, b2, a02), a03 = _mm256_fmadd_ps(a, b3, a03);
            a = _mm256_broadcast_ss(pj + 1);
            a10 = _mm256_fmadd_ps(a, b0, a10), a11 = _mm256_fmadd_ps(a, b1, a11);
            a12 = _mm256_fmadd_ps(a, b2, a12), a13 = _mm256_fmadd_ps(a, b3, a13);
            a = _mm256_broadcast_ss(pj + 2);
            a20 = _mm256_fmadd_ps(a, b0, a20), a21 = _mm256_fmadd_ps(a, b1, a21);
            a22 = _mm256_fmadd_ps(a, b2, a22), a23 = _mm256_fmadd_ps(a, b3, a23);
        }
        _mm256_storeu_ps(o0, a00), _mm256_storeu_ps(o0 + 8, a01);
        _mm256_storeu_ps(o0 + 16, a02), _mm256_storeu_ps(o0 + 24, a03);
        _mm256_storeu_ps(o1, a10), _mm256_storeu_ps(o1 + 8, a11);
        _mm256_storeu_ps(o1 + 16, a12), _mm256_storeu_ps(o1 + 24, a13);
        _mm256_storeu_ps(o2, a20), _mm256_storeu_ps(o2 + 8, a21);
        _mm256_storeu_ps(o2 + 16, a22), _mm256_storeu_ps(o2 + 24, a23);
    }
#endif
    for (int64_t r = 0; r < nr; ++r) /* columns past the register tiles; every column if nr < 3 */
        for (int64_t j = 0; j < n; ++j) {
            const float pj = p[j * ld + r];
            const float *vj = v[j];
            float *orow = o + r * d;
#pragma omp simd
            for (int64_t k = c; k < d; ++k) orow[k] += pj * vj[k];
        }
}

/* One online-softmax step over a tile of scores st (nk, ld) for query vectors [0, rows), rows a
 * multiple of 8: st becomes the weights exp(st - m) (masked scores, -inf, give 0), m and l the
 * running max and sum, corr the factor each earlier output must be scaled by. */
static inline void softmax_tile(float *st, int64_t nk, int64_t ld, int64_t rows, float *m,
                                float *l, float *corr) {
    int64_t r = 0;
#ifdef LLMOS_AVX2
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
    for (; r + 8 <= rows; r += 8) {
        const __m256 m_old = _mm256_loadu_ps(m + r);
        __m256 mx = m_old;
        for (int64_t j = 0; j < nk; ++j) mx = _mm256_max_ps(mx, _mm256_loadu_ps(st + j * ld + r));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < nk; ++j) {
            const __m256 s = _mm256_loadu_ps(st + j * ld + r);
            const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(s, mx)),
                                           _mm256_cmp_ps(s, neg_inf, _CMP_NEQ_OQ));
            _mm256_storeu_ps(st + j * ld + r, e);
            sum = _mm256_add_ps(sum, e);
        }
        /* why the blend: exp8 clamps, so exp(-inf) would come out ~1e-38, not the 0 it is */
        const __m256 c = _mm256_and_ps(exp8(_mm256_sub_ps(m_old, mx)),
                                       _mm256_cmp_ps(m_old, neg_inf, _CMP_NEQ_OQ));
        _mm256_storeu_ps(corr + r, c);
        _mm256_storeu_ps(l + r, _mm256_fmadd_ps(_mm256_loadu_ps(l + r), c, sum));
        _mm256_storeu_ps(m + r, mx);
    }
#endif
    for (; r < rows; ++r) {
        float mx = m[r], sum = 0.0f;
        for (int64_t j = 0; j < nk; ++j) mx = st[j * ld + r] > mx ? st[j * ld + r] : mx;
        for (int64_t j = 0; j < nk; ++j) {
            const float s = st[j * ld + r], e = s == -INFINITY ? 0.0f : expf(s - mx);
            st[j * ld + r] = e, sum += e;
        }
        corr[r] = m[r] == -INFINITY ? 0.0f : expf(m[r] - mx);
        l[r] = l[r] * corr[r] + sum, m[r] = mx;
    }
}

/* One thread's buffers for llmos_paged_prefill_attention (ld: query vectors, padded to 16). */
typedef struct {
    float *qt;                 /* (D, ld) scaled query vectors, transposed; vector r = token
                                * (r / group) of the tile, head r % group */
    float *st;                 /* (PF_KEYS, ld) scores, then softmax weights */
    float *o;                  /* (ld, D) unnormalised outputs */
    float *m, *l, *corr;       /* (ld,) running max, running sum, this tile's rescale factor */
    float *zero;               /* (D,) a zero key row, for padding a tile to 6-key groups */
    float *kw, *vw;            /* (PF_KEYS, D) the tile's K and V rows widened (fp16 caches) */
    const float **k, **v;      /* (PF_KEYS,) the K and V rows of the tile */
} PrefillScratch;

/* One work item: tokens [i0, i1) of a chunk whose first token sits at position `base`, the
 * `group` query heads of KV head kvh. q rows at q (q_stride floats apart), out rows at out. */
static void prefill_item(const float *q, float *out, const void *k_cache, const void *v_cache,
                         int half, const int64_t *table, int64_t base, int64_t i0, int64_t i1,
                         int64_t kvh, int64_t group, int64_t num_kv_heads, int64_t head_dim,
                         int64_t block_size, int64_t q_stride, int64_t out_stride, float scale,
                         PrefillScratch *w) {
    const int64_t d = head_dim, rows = (i1 - i0) * group, ld = (rows + 15) / 16 * 16;
    for (int64_t r = 0; r < ld; ++r) {
        if (r < rows) {
            const float *src = q + (i0 + r / group) * q_stride + (kvh * group + r % group) * d;
            for (int64_t i = 0; i < d; ++i) w->qt[i * ld + r] = src[i] * scale;
        } else { /* padding: scored against every key, never written out */
            for (int64_t i = 0; i < d; ++i) w->qt[i * ld + r] = 0.0f;
        }
        w->m[r] = -INFINITY, w->l[r] = 0.0f;
    }
    memset(w->o, 0, sizeof(float) * (size_t)(ld * d));
    const int64_t n_keys = base + i1; /* the tile's last token sees keys [0, base + i1) */
    int64_t b = 0, off = 0;           /* where key t0 lies: block table[b], offset off */
    for (int64_t t0 = 0; t0 < n_keys; t0 += PF_KEYS) {
        const int64_t nk = n_keys - t0 < PF_KEYS ? n_keys - t0 : PF_KEYS;
        const int64_t padded = (nk + 5) / 6 * 6;
        for (int64_t j = 0; j < padded; ++j) {
            if (j < nk) {
                const int64_t at = ((table[b] * block_size + off) * num_kv_heads + kvh) * d;
#ifdef LLMOS_KV_HALF
                if (half) {
                    widen_half(w->kw + j * d, (const uint16_t *)k_cache + at, d);
                    widen_half(w->vw + j * d, (const uint16_t *)v_cache + at, d);
                    w->k[j] = w->kw + j * d, w->v[j] = w->vw + j * d;
                } else
#endif
                    w->k[j] = (const float *)k_cache + at, w->v[j] = (const float *)v_cache + at;
                if (++off == block_size) off = 0, ++b;
            } else {
                w->k[j] = w->zero;
            }
        }
        for (int64_t j = 0; j < padded; j += 6)
            for (int64_t r = 0; r < ld; r += 16)
                key_scores(w->k + j, w->qt + r, ld, w->st + j * ld + r, d);
        /* mask: key t0 + j is hidden from vector r iff t0 + j > base + i0 + r / group, i.e. from
         * the first (t0 + j - base - i0) * group vectors (padding vectors see every real key) */
        for (int64_t j = base + i0 + 1 - t0 > 0 ? base + i0 + 1 - t0 : 0; j < nk; ++j) {
            const int64_t hidden = (t0 + j - base - i0) * group;
            float *sj = w->st + j * ld;
            for (int64_t r = 0; r < (hidden < rows ? hidden : rows); ++r) sj[r] = -INFINITY;
        }
        softmax_tile(w->st, nk, ld, ld, w->m, w->l, w->corr);
        for (int64_t r = 0; r < ld; ++r) {
            float *orow = w->o + r * d;
            const float c = w->corr[r];
            for (int64_t i = 0; i < d; ++i) orow[i] *= c;
        }
        for (int64_t r = 0; r < rows; r += 3) /* padding vectors need no output */
            weighted_tile(w->o + r * d, w->st + r, ld, w->v, nk, d, rows - r < 3 ? rows - r : 3);
    }
    for (int64_t r = 0; r < rows; ++r) {
        float *dst = out + (i0 + r / group) * out_stride + (kvh * group + r % group) * d;
        const float inv = 1.0f / w->l[r], *src = w->o + r * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = src[i] * inv;
    }
}

/* Causal attention for `num_chunks` prefill chunks: chunk c holds query_lens[c] tokens at rows
 * starts[c] .. of q and out, the last of its context_lens[c] positions (the earlier ones are
 * cached), and its block table row c. Token i of the chunk attends keys
 * [0, context_lens[c] - query_lens[c] + i]. Layouts as llmos_paged_decode_attention's.
 * Returns 0, or a non-zero status (nothing computed): 1 heads, 2 lengths, 3 out of memory,
 * 4 block ids, 5 rows, 8 an fp16 cache (kv_half) on a build without F16C. */
int llmos_paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache,
                                  const int64_t *block_tables, const int64_t *starts,
                                  const int64_t *query_lens, const int64_t *context_lens,
                                  float *out, int64_t q_stride, int64_t num_chunks,
                                  int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                  int64_t block_size, int64_t max_blocks, int64_t num_blocks,
                                  int64_t num_rows, float scale, int kv_half) {
    if (kv_half && !llmos_kv_half_supported()) return 8;
    const int64_t group = num_kv_heads > 0 ? num_heads / num_kv_heads : 0;
    if (group < 1 || group > MAX_GROUP || group * num_kv_heads != num_heads) return 1;
    int64_t items = 0, work = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t n = query_lens[c], len = context_lens[c];
        if (n < 1 || n > len || len > max_blocks * block_size) return 2;
        if (starts[c] < 0 || starts[c] > num_rows - n) return 5;
        const int64_t *table = block_tables + c * max_blocks;
        for (int64_t b = 0; b * block_size < len; ++b)
            if (table[b] < 0 || table[b] >= num_blocks) return 4;
        items += (n + PF_TOKENS - 1) / PF_TOKENS * num_kv_heads;
        work += n * len;
    }
    /* item k -> (chunk, tile, KV head); a chunk's later (longer) tiles first */
    int64_t *item_of = malloc(sizeof(int64_t) * (size_t)(3 * items + 1));
    if (item_of == NULL) return 3;
    for (int64_t c = 0, k = 0; c < num_chunks; ++c)
        for (int64_t t = (query_lens[c] + PF_TOKENS - 1) / PF_TOKENS - 1; t >= 0; --t)
            for (int64_t h = 0; h < num_kv_heads; ++h, ++k)
                item_of[3 * k] = c, item_of[3 * k + 1] = t, item_of[3 * k + 2] = h;
    const int64_t ld = (PF_TOKENS * group + 15) / 16 * 16; /* query vectors of an item */
    int failed = 0;
#pragma omp parallel if (work * num_heads * head_dim >= (1 << 18))
    {
        PrefillScratch w = {0};
        const size_t floats = (size_t)(2 * ld * head_dim + PF_KEYS * ld + 3 * ld + head_dim +
                                       (kv_half ? 2 * PF_KEYS * head_dim : 0));
        float *buf = calloc(floats, sizeof(float));
        const float **rows = malloc(sizeof(float *) * 2 * PF_KEYS);
        if (buf == NULL || rows == NULL) {
#pragma omp atomic write
            failed = 3;
        } else {
            w.qt = buf, w.o = w.qt + ld * head_dim, w.st = w.o + ld * head_dim;
            w.m = w.st + PF_KEYS * ld, w.l = w.m + ld, w.corr = w.l + ld, w.zero = w.corr + ld;
            w.kw = w.zero + head_dim, w.vw = w.kw + PF_KEYS * head_dim;
            w.k = rows, w.v = rows + PF_KEYS;
        }
#pragma omp for schedule(dynamic)
        for (int64_t k = 0; k < items; ++k) {
            if (buf == NULL || rows == NULL) continue;
            const int64_t c = item_of[3 * k], t = item_of[3 * k + 1], h = item_of[3 * k + 2];
            const int64_t n = query_lens[c], i0 = t * PF_TOKENS;
            const int64_t i1 = i0 + PF_TOKENS < n ? i0 + PF_TOKENS : n;
            prefill_item(q + starts[c] * q_stride, out + starts[c] * num_heads * head_dim, k_cache,
                         v_cache, kv_half, block_tables + c * max_blocks, context_lens[c] - n, i0, i1, h,
                         group, num_kv_heads, head_dim, block_size, q_stride,
                         num_heads * head_dim, scale, &w);
        }
        free(buf);
        free((void *)rows);
    }
    free(item_of);
    return failed;
}

/* ---------------------------------------------------------------- per-layer ops */

/* One row of llmos_add_rms_norm. */
static inline void norm_row(float *xr, const float *dr, const float *w, float *orow, int64_t dim,
                            float eps) {
    if (dr != NULL)
        for (int64_t j = 0; j < dim; ++j) xr[j] += dr[j];
    float ss = 0.0f;
    for (int64_t j = 0; j < dim; ++j) ss += xr[j] * xr[j];
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int64_t j = 0; j < dim; ++j) orow[j] = w[j] * (xr[j] * inv);
}

/* If delta: x += delta (the residual stream, in place). Then out = x / rms(x) * w, as HF's
 * RMSNorm in fp32: rsqrt(mean(x^2) + eps). x, delta, out (rows, dim); w (dim,). */
void llmos_add_rms_norm(float *x, const float *delta, const float *w, float *out, int64_t rows,
                        int64_t dim, float eps) {
#pragma omp parallel for if (rows >= 64)
    for (int64_t r = 0; r < rows; ++r)
        norm_row(x + r * dim, delta != NULL ? delta + r * dim : NULL, w, out + r * dim, dim, eps);
}

/* One row of llmos_rope: `heads` heads of head_dim at v, rotated by tables rows c and s. */
static inline void rope_row(float *v, int64_t heads, int64_t head_dim, const float *c,
                            const float *s) {
    const int64_t half = head_dim / 2;
    for (int64_t h = 0; h < heads; ++h, v += head_dim)
        for (int64_t i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * c[i] - b * s[i];
            v[i + half] = b * c[i + half] + a * s[i + half];
        }
}

/* Rotate-half RoPE in place on the first `heads` heads of each row of x (rows, row_stride):
 * for i < D/2: (a, b) = (x[i], x[i + D/2]) -> (a cos_i - b sin_i, b cos_{i+D/2} + a sin_{i+D/2}).
 * cos, sin (P, D) tables; positions (rows,) index them. Returns 1 (nothing rotated) when a
 * position is outside [0, P). */
int llmos_rope(float *x, int64_t rows, int64_t row_stride, int64_t heads, int64_t head_dim,
               const int64_t *positions, int64_t num_positions, const float *cos_t,
               const float *sin_t) {
    for (int64_t r = 0; r < rows; ++r)
        if (positions[r] < 0 || positions[r] >= num_positions) return 1;
#pragma omp parallel for if (rows >= 64)
    for (int64_t r = 0; r < rows; ++r)
        rope_row(x + r * row_stride, heads, head_dim, cos_t + positions[r] * head_dim,
                 sin_t + positions[r] * head_dim);
    return 0;
}

/* o[j] = silu(g[j]) * u[j] for j < n. */
static inline void silu_mul_span(const float *g, const float *u, float *o, int64_t n) {
    int64_t j = 0;
#ifdef LLMOS_AVX2
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= n; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)); /* exp(-g) */
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(u + j)));
    }
#endif
    for (; j < n; ++j) o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* out (rows, inter) = silu(gate) * up, with gate_up (rows, 2 * inter) = [gate | up]. */
void llmos_silu_mul(const float *gate_up, float *out, int64_t rows, int64_t inter) {
#pragma omp parallel for if (rows >= 16)
    for (int64_t r = 0; r < rows; ++r)
        silu_mul_span(gate_up + r * 2 * inter, gate_up + r * 2 * inter + inter, out + r * inter,
                      inter);
}

/* ---------------------------------------------------------------- linear layers
 *
 * y (M, N) = x (M, K) @ W (N, K)^T [* scale (N,) per output column], W in its storage type:
 *   LLMOS_W_F32  float32
 *   LLMOS_W_F16  IEEE half (converted with F16C): half the bytes to read
 *   LLMOS_W_I8   int8 with one fp32 scale per output row (symmetric, per channel): a quarter
 *   LLMOS_W_BF16 bfloat16 (widened by a shift or a mask): half the bytes; with AVX512_BF16
 *                and at least LIN_BROWS rows, the rows of x are rounded to bf16 too and
 *                multiplied pairwise with vdpbf16ps or on AMX tiles, accumulating in fp32
 *                (below); its panels hold k in pairs (below), K even
 *   LLMOS_W_Q4   4 bits in blocks of 32 values of k with an fp16 scale and minimum each (GGUF's
 *                Q4_1): 5 bits per weight to read; its own block layout (below)
 *   LLMOS_W_Q8   int8 in blocks of 32 values of k with an fp16 scale each (GGUF's Q8_0): 8.5
 *                bits per weight; the same block scheme
 * W is stored packed: ceil(N/16) panels, panel p holding W[16p .. 16p+15][k] at element offset
 * (p * K + k) * 16 + j (rows past N are zero). Reading a panel is one sequential stream, and a
 * step of k multiplies 16 weights (two vectors, converted once) by one broadcast x value for each
 * of up to LIN_PMR rows of x: outer products, no horizontal sums, the conversion shared by all
 * rows. bf16 panels go in k pairs instead: W[16p + j][k] at (p * K + k - k % 2) * 16 + 2j + k % 2,
 * so a 32-bit lane holds output j's weights at an even k (low half) and k + 1 (high half), the
 * layout vdpbf16ps and AMX multiply from memory; a shift (even k) or a mask (odd k) widens a
 * lane to fp32. Threads take contiguous ranges of panels. Rows of x go in passes of ~192 KB (all of a
 * decode batch in one): each panel is read once per pass and from cache for every further LIN_PMR
 * rows, while the pass's x rows stay in L2. Accumulation is fp32 along k, except for int8 weights
 * and at least LIN_QROWS rows: those quantise each row of x to 16 bits and multiply in integers
 * (below; each product within half of 1/32767 of its row's largest |x|).
 * x rows are `x_stride` floats apart (a slice of a wider tensor is fine); y is contiguous.
 * Returns 0; 1 when this build has no AVX2/FMA/F16C (the caller uses torch instead); 2 for an
 * unknown weight type; 3 for block-quantised weights whose K is not a multiple of 32 (or over
 * LIN_BLK_MAX_K), or bf16 weights of an odd K.
 */
enum {
    LLMOS_W_F32 = 0, LLMOS_W_F16 = 1, LLMOS_W_I8 = 2, LLMOS_W_BF16 = 3, LLMOS_W_Q4 = 4, LLMOS_W_Q8 = 5
};

/* Rows of x from which int8 weights take the integer path below (fewer: fp32 products). */
#define LIN_QROWS 12
int llmos_linear_int_rows(void) { return LIN_QROWS; }

/* The vector width of the linear kernel in this build: 512 (AVX-512), 256 (AVX2), 0 (none). */
int llmos_linear_vector_bits(void) {
#if defined(LLMOS_AVX2) && defined(__F16C__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
    return 512;
#elif defined(LLMOS_AVX2) && defined(__F16C__)
    return 256;
#else
    return 0;
#endif
}

int llmos_linear_supported(void) {
#if defined(LLMOS_AVX2) && defined(__F16C__)
    return 1;
#else
    return 0;
#endif
}

#if defined(LLMOS_AVX2) && defined(__F16C__)
#define LIN_PNR 16
#define LIN_PMR 6 /* 12 accumulators + 2 weight vectors + 1 broadcast = 15 ymm */
#define LIN_WIDEN_ROWS 24 /* rows from which fp16/int8 panels are widened to fp32 once per pass */

/* Weights jo .. jo + 7 (jo 0 or 8) at k of the bf16 panel from element `base` (k pairs, above):
 * bf16 is the upper half of an fp32, so the lane of an even k shifts up, an odd k's is masked.
 * `odd` is k % 2, a constant where the caller knows it. */
static inline __attribute__((always_inline)) __m256 load_bf8(const void *w, int64_t base,
                                                            int64_t k, int64_t jo, const int odd) {
    const __m256i v = _mm256_loadu_si256(
        (const __m256i *)((const uint16_t *)w + base + (k >> 1) * 2 * LIN_PNR + 2 * jo));
    return _mm256_castsi256_ps(odd ? _mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u))
                                   : _mm256_slli_epi32(v, 16));
}

/* Weights jo .. jo + 7 (jo 0 or 8) at k of the panel from element `base`, as fp32. */
static inline __attribute__((always_inline)) __m256 load_w8(const void *w, int wt, int64_t base,
                                                           int64_t k, int64_t jo) {
    const int64_t i = base + k * LIN_PNR + jo;
    if (wt == LLMOS_W_F32) return _mm256_loadu_ps((const float *)w + i);
    if (wt == LLMOS_W_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    if (wt == LLMOS_W_BF16) return load_bf8(w, base, k, jo, (int)(k & 1));
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + i))));
}

static inline __attribute__((always_inline)) void lin_panel_store(float *y, int64_t N,
                                                                 int64_t row, int64_t n0,
                                                                 __m256 a0, __m256 a1,
                                                                 const float *scale) {
    float *dst = y + row * N + n0;
    if (n0 + LIN_PNR <= N) {
        if (scale != NULL) {
            a0 = _mm256_mul_ps(a0, _mm256_loadu_ps(scale + n0));
            a1 = _mm256_mul_ps(a1, _mm256_loadu_ps(scale + n0 + 8));
        }
        _mm256_storeu_ps(dst, a0);
        _mm256_storeu_ps(dst + 8, a1);
    } else { /* the last, partial panel: neither y nor scale extend past N */
        float tmp[LIN_PNR];
        _mm256_storeu_ps(tmp, a0);
        _mm256_storeu_ps(tmp + 8, a1);
        for (int64_t j = 0; j < N - n0; ++j) dst[j] = scale != NULL ? tmp[j] * scale[n0 + j] : tmp[j];
    }
}

/* mt (<= LIN_PMR, a constant at each call site) rows of x from m0 against panel p, whose
 * weights start at element `base` of w. */
static inline __attribute__((always_inline)) void lin_ptile(const float *x, int64_t x_stride,
                                                           const void *w, int wt, int64_t base,
                                                           int64_t p, int64_t K, int64_t N,
                                                           const float *scale, float *y,
                                                           int64_t m0, const int mt) {
    __m256 acc[LIN_PMR][2];
#pragma GCC unroll 8
    for (int i = 0; i < mt; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    if (wt == LLMOS_W_BF16) { /* k pairs (K even): the parity of k is a constant in each half */
        for (int64_t k = 0; k < K; k += 2) {
#pragma GCC unroll 2
            for (int e = 0; e < 2; ++e) {
                const __m256 w0 = load_bf8(w, base, k, 0, e), w1 = load_bf8(w, base, k, 8, e);
#pragma GCC unroll 8
                for (int i = 0; i < mt; ++i) {
                    const __m256 xb = _mm256_broadcast_ss(x + (m0 + i) * x_stride + k + e);
                    acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
                    acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
                }
            }
        }
    } else {
        for (int64_t k = 0; k < K; ++k) {
            const __m256 w0 = load_w8(w, wt, base, k, 0), w1 = load_w8(w, wt, base, k, 8);
#pragma GCC unroll 8
            for (int i = 0; i < mt; ++i) {
                const __m256 xb = _mm256_broadcast_ss(x + (m0 + i) * x_stride + k);
                acc[i][0] = _mm256_fmadd_ps(xb, w0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(xb, w1, acc[i][1]);
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < mt; ++i)
        lin_panel_store(y, N, m0 + i, p * LIN_PNR, acc[i][0], acc[i][1], scale);
}

/* One row of x against panel p: four k phases in separate accumulators, so eight FMA chains
 * are in flight instead of two (a single row is otherwise bound by FMA latency). */
static inline __attribute__((always_inline)) void lin_prow1(const float *x, const void *w, int wt,
                                                           int64_t p, int64_t K, int64_t N,
                                                           const float *scale, float *y) {
    __m256 a[4][2];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) a[u][0] = a[u][1] = _mm256_setzero_ps();
    const int64_t base = p * K * LIN_PNR;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) { /* k is a multiple of 4: k + u has u's parity */
            const __m256 xb = _mm256_broadcast_ss(x + k + u);
            const __m256 w0 = wt == LLMOS_W_BF16 ? load_bf8(w, base, k + u, 0, u & 1)
                                                 : load_w8(w, wt, base, k + u, 0);
            const __m256 w1 = wt == LLMOS_W_BF16 ? load_bf8(w, base, k + u, 8, u & 1)
                                                 : load_w8(w, wt, base, k + u, 8);
            a[u][0] = _mm256_fmadd_ps(xb, w0, a[u][0]);
            a[u][1] = _mm256_fmadd_ps(xb, w1, a[u][1]);
        }
    }
    for (; k < K; ++k) {
        const __m256 xb = _mm256_broadcast_ss(x + k);
        a[0][0] = _mm256_fmadd_ps(xb, load_w8(w, wt, base, k, 0), a[0][0]);
        a[0][1] = _mm256_fmadd_ps(xb, load_w8(w, wt, base, k, 8), a[0][1]);
    }
    const __m256 s0 = _mm256_add_ps(_mm256_add_ps(a[0][0], a[1][0]), _mm256_add_ps(a[2][0], a[3][0]));
    const __m256 s1 = _mm256_add_ps(_mm256_add_ps(a[0][1], a[1][1]), _mm256_add_ps(a[2][1], a[3][1]));
    lin_panel_store(y, N, 0, p * LIN_PNR, s0, s1, scale);
}

/* ---- int8 weights, 16-bit activations, integer products (vpmaddwd)
 *
 * Why: an AVX2 core issues vpmaddwd (16 multiply-adds) about as often as an 8-wide FMA, so with
 * int8 weights and enough rows to reuse each weight panel, integer products do up to ~1.5x the
 * multiply-adds per cycle of the fp32 path (measured on SmolLM2-135M's shapes, 12 to 2048 rows:
 * 1.15-1.6x). Below LIN_QROWS rows the weights' memory traffic dominates and the fp32 path,
 * which needs no per-call quantisation, is faster.
 * Activations are quantised per row, symmetric, round to nearest: q = round(x * 32767 /
 * max|x_row|), so each value is off by at most half of 1/32767 of its row's largest magnitude;
 * nothing is clipped, an outlier channel only coarsens its own row's step (a single 7-bit scale
 * for the whole input, as fbgemm's dynamic int8 uses, is what ruins perplexity, see quant.py).
 * Products of int8 weights and 16-bit activations are exact; they sum in int32 over LIN_QKC
 * values of k (LIN_QKC * 127 * 32768 < 2^31: no input can overflow) and then in fp32; the
 * result is acc * s_row * s_channel. */
#define LIN_QLEVELS 32767.0f
#define LIN_QKC 512 /* values of k summed in int32 before the fp32 sum */

/* Rows [0, rows) of x into xq (rows of kp = K rounded up to even int16s, the pad zero) and
 * their scales into sx (max|x_row| / 32767; 0 for a row with no |x| above 1e-34, whose q are
 * all 0). */
static void lin_quantize_rows(const float *x, int64_t x_stride, int64_t rows, int64_t K,
                              int64_t kp, int16_t *xq, float *sx) {
    for (int64_t m = 0; m < rows; ++m) {
        const float *xr = x + m * x_stride;
        int16_t *qr = xq + m * kp;
        __m256 mx = _mm256_setzero_ps();
        const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        int64_t k = 0;
        for (; k + 8 <= K; k += 8)
            mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xr + k), abs_mask));
        float amax = 0.0f;
        float lanes[8];
        _mm256_storeu_ps(lanes, mx);
        for (int j = 0; j < 8; ++j) amax = lanes[j] > amax ? lanes[j] : amax;
        for (; k < K; ++k) amax = fabsf(xr[k]) > amax ? fabsf(xr[k]) : amax;
        /* why the floor: 32767 / max|x| must stay finite; a row that small is taken as zero */
        const float inv = amax > 1e-34f ? LIN_QLEVELS / amax : 0.0f;
        sx[m] = inv > 0.0f ? amax / LIN_QLEVELS : 0.0f;
        const __m256 vi = _mm256_set1_ps(inv);
        k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), vi));
            const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k + 8), vi));
            _mm256_storeu_si256((__m256i *)(qr + k),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
        }
        for (; k < K; ++k) qr[k] = (int16_t)lrintf(xr[k] * inv);
        if (kp > K) qr[K] = 0;
    }
}

/* Software prefetch of weight streams, LIN_PF_AHEAD bytes ahead, into all cache levels
 * (prefetcht0). Why t0: on a 2-core Xeon with AVX-512 and AMX, prefetchnta held the 1-row
 * product to 13.7 GB/s (the fills skip L2, and few lines are in flight per core), t0 reads
 * 36-44 GB/s; the multi-row fp32 tiles (LIN_TILE_PF) prefetch too, 1.5x at 16-256 rows there.
 * The -D overrides are for measuring. */
#ifndef LIN_PF_AHEAD
#define LIN_PF_AHEAD 2048 /* bytes: measured best of 1, 2 and 4 KB at batch 1 */
#endif
#ifndef LIN_PF_HINT
#define LIN_PF_HINT 3
#endif
#ifndef LIN_TILE_PF
#define LIN_TILE_PF 1
#endif
/* The 1-row products against 4- and 8-bit blocks (lin_blk_row1, lin_blk_vrow1) prefetch further
 * and into L2 only (prefetcht1). Why: their arithmetic per byte is a fraction of fp32's, so 2 KB
 * ahead is too close to hide DRAM latency, and fills into L1 cap the lines in flight per core.
 * Measured on a 2-core Zen 4 VM, SmolLM2's int4 decoder stack (66 MB of Q4_1) per step:
 * t0 2 KB 4.2-4.7 ms, t1 2 KB 4.2, t1 8 KB 3.1-3.4, t1 16/32 KB 3.1, t2 8 KB 3.0, nta 4.8;
 * the bf16 and fp32 stacks did not gain from t1 8 KB, so they keep LIN_PF_*. */
#ifndef LIN_BLK_PF_AHEAD
#define LIN_BLK_PF_AHEAD 8192
#endif
#ifndef LIN_BLK_PF_HINT
#define LIN_BLK_PF_HINT 2
#endif

/* Panel p of int8 weights ((K, 16) as stored) into wq as (kp / 2, 16, 2) int16: each 32-bit
 * lane holds one output channel's weights at k and k + 1, as vpmaddwd pairs them. */
static void lin_widen_pairs(const int8_t *w, int64_t K, int64_t kp, int16_t *wq) {
    for (int64_t k = 0; k < kp; k += 2) {
        if ((k & 3) == 0) __builtin_prefetch(w + k * LIN_PNR + LIN_PF_AHEAD, 0, LIN_PF_HINT);
        const __m128i r0 = _mm_loadu_si128((const __m128i *)(w + k * LIN_PNR));
        const __m128i r1 = k + 1 < K ? _mm_loadu_si128((const __m128i *)(w + (k + 1) * LIN_PNR))
                                     : _mm_setzero_si128();
        _mm256_storeu_si256((__m256i *)(wq + k * LIN_PNR),
                            _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(r0, r1)));
        _mm256_storeu_si256((__m256i *)(wq + k * LIN_PNR + 16),
                            _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(r0, r1)));
    }
}

/* Six quantised rows (xq rows m..m+5) against one widened panel over pairs [c0, c1) of k:
 * int32 sums into acc (6 rows x 2 vectors). Written as assembly because GCC spills the twelve
 * accumulators of this loop or copies them each iteration, which costs the integer product its
 * advantage; the loop uses exactly the 16 ymm registers. */
static inline void lin_qkernel6(const int16_t *x0, int64_t kp, const int16_t *wq, int64_t c0,
                                int64_t c1, __m256i acc[6][2]) {
    const char *xa = (const char *)(x0 + c0);
    const char *xb = (const char *)(x0 + 3 * kp + c0);
    const char *w = (const char *)(wq + c0 * LIN_PNR);
    const int64_t stride = kp * 2;
    int64_t n = (c1 - c0) / 2;
#define LIN_QROW(ADDR, A, B)                                                                   \
    "vpbroadcastd " ADDR ", %%ymm14\n\t"                                                       \
    "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                                                   \
    "vpaddd %%ymm15, %%ymm" A ", %%ymm" A "\n\t"                                               \
    "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"                                                   \
    "vpaddd %%ymm15, %%ymm" B ", %%ymm" B "\n\t"
    __asm__ volatile("vmovdqu (%[acc]), %%ymm0\n\t"
                     "vmovdqu 32(%[acc]), %%ymm1\n\t"
                     "vmovdqu 64(%[acc]), %%ymm2\n\t"
                     "vmovdqu 96(%[acc]), %%ymm3\n\t"
                     "vmovdqu 128(%[acc]), %%ymm4\n\t"
                     "vmovdqu 160(%[acc]), %%ymm5\n\t"
                     "vmovdqu 192(%[acc]), %%ymm6\n\t"
                     "vmovdqu 224(%[acc]), %%ymm7\n\t"
                     "vmovdqu 256(%[acc]), %%ymm8\n\t"
                     "vmovdqu 288(%[acc]), %%ymm9\n\t"
                     "vmovdqu 320(%[acc]), %%ymm10\n\t"
                     "vmovdqu 352(%[acc]), %%ymm11\n\t"
                     "1:\n\t"
                     "vmovdqu (%[w]), %%ymm12\n\t"
                     "vmovdqu 32(%[w]), %%ymm13\n\t"
                     LIN_QROW("(%[xa])", "0", "1")
                     LIN_QROW("(%[xa],%[s])", "2", "3")
                     LIN_QROW("(%[xa],%[s],2)", "4", "5")
                     LIN_QROW("(%[xb])", "6", "7")
                     LIN_QROW("(%[xb],%[s])", "8", "9")
                     LIN_QROW("(%[xb],%[s],2)", "10", "11")
                     "add $4, %[xa]\n\t"
                     "add $4, %[xb]\n\t"
                     "add $64, %[w]\n\t"
                     "dec %[n]\n\t"
                     "jnz 1b\n\t"
                     "vmovdqu %%ymm0, (%[acc])\n\t"
                     "vmovdqu %%ymm1, 32(%[acc])\n\t"
                     "vmovdqu %%ymm2, 64(%[acc])\n\t"
                     "vmovdqu %%ymm3, 96(%[acc])\n\t"
                     "vmovdqu %%ymm4, 128(%[acc])\n\t"
                     "vmovdqu %%ymm5, 160(%[acc])\n\t"
                     "vmovdqu %%ymm6, 192(%[acc])\n\t"
                     "vmovdqu %%ymm7, 224(%[acc])\n\t"
                     "vmovdqu %%ymm8, 256(%[acc])\n\t"
                     "vmovdqu %%ymm9, 288(%[acc])\n\t"
                     "vmovdqu %%ymm10, 320(%[acc])\n\t"
                     "vmovdqu %%ymm11, 352(%[acc])\n\t"
                     : [xa] "+r"(xa), [xb] "+r"(xb), [w] "+r"(w), [n] "+r"(n)
                     : [s] "r"(stride), [acc] "r"(acc)
                     : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
                       "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc",
                       "memory");
#undef LIN_QROW
}

/* mt (<= LIN_PMR, a constant at each call site) quantised rows from xq row m against the
 * widened panel wq of panel p, into rows y_row.. of y. */
static inline __attribute__((always_inline)) void lin_qtile(const int16_t *xq, int64_t kp,
                                                           const float *sx, const int16_t *wq,
                                                           int64_t p, int64_t N,
                                                           const float *scale, float *y,
                                                           int64_t y_row, int64_t m,
                                                           const int mt) {
    __m256 f[LIN_PMR][2];
#pragma GCC unroll 8
    for (int i = 0; i < mt; ++i) f[i][0] = f[i][1] = _mm256_setzero_ps();
    for (int64_t c0 = 0; c0 < kp; c0 += LIN_QKC) {
        const int64_t c1 = c0 + LIN_QKC < kp ? c0 + LIN_QKC : kp;
        __m256i acc[LIN_PMR][2];
#pragma GCC unroll 8
        for (int i = 0; i < mt; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
        if (mt == 6) { /* LIN_PMR */
            lin_qkernel6(xq + m * kp, kp, wq, c0, c1, acc);
        } else for (int64_t k = c0; k < c1; k += 2) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(wq + k * LIN_PNR));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(wq + k * LIN_PNR + 16));
#pragma GCC unroll 8
            for (int i = 0; i < mt; ++i) {
                int32_t pair;
                memcpy(&pair, xq + (m + i) * kp + k, sizeof pair);
                const __m256i xb = _mm256_set1_epi32(pair);
                acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(xb, w0));
                acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(xb, w1));
            }
        }
#pragma GCC unroll 8
        for (int i = 0; i < mt; ++i) {
            f[i][0] = _mm256_add_ps(f[i][0], _mm256_cvtepi32_ps(acc[i][0]));
            f[i][1] = _mm256_add_ps(f[i][1], _mm256_cvtepi32_ps(acc[i][1]));
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < mt; ++i) {
        const __m256 s = _mm256_set1_ps(sx[m + i]);
        lin_panel_store(y, N, y_row + i, p * LIN_PNR, _mm256_mul_ps(f[i][0], s),
                        _mm256_mul_ps(f[i][1], s), scale);
    }
}

/* The integer path over panels [p0, p1) for all M rows, in passes of ~192 KB of quantised rows
 * (as lin_row_block). Each thread quantises the rows itself (M * K work against its share of
 * M * K * N), so threads need not meet. Returns 0 when out of memory (nothing written). */
__attribute__((unused)) /* in a 512-bit build lin_zq_range replaces it */
static int lin_i8q_range(const float *x, int64_t x_stride, int64_t M, const void *w, int64_t K,
                         int64_t N, const float *scale, float *y, int64_t p0, int64_t p1) {
    const int64_t kp = K + (K & 1);
    int64_t mb = (192 * 1024 / 2) / kp;
    mb -= mb % LIN_PMR;
    if (mb < LIN_PMR) mb = LIN_PMR;
    if (mb > M) mb = M;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(mb * kp));
    int16_t *wq = malloc(sizeof(int16_t) * (size_t)(kp * LIN_PNR));
    float *sx = malloc(sizeof(float) * (size_t)mb);
    if (xq == NULL || wq == NULL || sx == NULL) {
        free(xq);
        free(wq);
        free(sx);
        return 0;
    }
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t rows = m0 + mb < M ? mb : M - m0;
        lin_quantize_rows(x + m0 * x_stride, x_stride, rows, K, kp, xq, sx);
        for (int64_t p = p0; p < p1; ++p) {
            lin_widen_pairs((const int8_t *)w + p * K * LIN_PNR, K, kp, wq);
            int64_t m = 0;
            for (; m + LIN_PMR <= rows; m += LIN_PMR)
                lin_qtile(xq, kp, sx, wq, p, N, scale, y, m0 + m, m, LIN_PMR);
            switch (rows - m) {
            case 5: lin_qtile(xq, kp, sx, wq, p, N, scale, y, m0 + m, m, 5); break;
            case 4: lin_qtile(xq, kp, sx, wq, p, N, scale, y, m0 + m, m, 4); break;
            case 3: lin_qtile(xq, kp, sx, wq, p, N, scale, y, m0 + m, m, 3); break;
            case 2: lin_qtile(xq, kp, sx, wq, p, N, scale, y, m0 + m, m, 2); break;
            case 1: lin_qtile(xq, kp, sx, wq, p, N, scale, y, m0 + m, m, 1); break;
            default: break;
            }
        }
    }
    free(xq);
    free(wq);
    free(sx);
    return 1;
}

/* Rows of x per pass over the panels: a pass keeps its x rows (MB * K floats) in L2 while every
 * panel streams by once, instead of re-reading all of a tall x from L3 for each panel. */
static inline int64_t lin_row_block(int64_t K) {
    int64_t mb = (192 * 1024 / 4) / (K > 0 ? K : 1); /* ~192 KB of x */
    mb -= mb % LIN_PMR;
    return mb < LIN_PMR ? LIN_PMR : mb;
}

/* One function per weight type, so the type is a constant inside the OpenMP-outlined loop
 * (GCC outlines parallel regions before inlining, which would otherwise leave `wt` a variable
 * tested on every load). NAME_range computes panels [p0, p1) for every row pass; NAME gives
 * each thread a contiguous range of panels, the same in every pass, and passes write disjoint
 * rows, so no barrier separates them. */
#define LIN_PARALLEL(NAME)                                                                      \
    static void NAME(const float *x, int64_t x_stride, int64_t M, const void *w, int64_t K,     \
                     int64_t N, const float *scale, float *y) {                                 \
        const int64_t panels = (N + LIN_PNR - 1) / LIN_PNR;                                     \
        _Pragma("omp parallel if (panels > 1)") {                                               \
            const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();               \
            NAME##_range(x, x_stride, M, w, K, N, scale, y, panels * tid / nt,                  \
                         panels * (tid + 1) / nt);                                              \
        }                                                                                       \
    }

#define LIN_PDEFINE(NAME, WT)                                                                   \
    static void NAME##_range(const float *x, int64_t x_stride, int64_t M, const void *w,        \
                             int64_t K, int64_t N, const float *scale, float *y, int64_t p0,    \
                             int64_t p1) {                                                      \
        if (WT == LLMOS_W_I8 && M >= LIN_QROWS &&                                               \
            lin_i8q_range(x, x_stride, M, w, K, N, scale, y, p0, p1))                           \
            return;                                                                             \
        const int64_t mb = lin_row_block(K);                                                    \
        /* why: with many rows, each fp16/int8 weight would be converted once per 6-row tile; \
         * widening the panel to fp32 once per pass (into an L2-resident buffer) saves those  \
         * conversion instructions, which otherwise crowd the FMAs */                         \
        float *wide = WT != LLMOS_W_F32 && M >= LIN_WIDEN_ROWS                                  \
                          ? malloc(sizeof(float) * (size_t)(K * LIN_PNR))                       \
                          : NULL;                                                               \
        for (int64_t m0 = 0; m0 < M; m0 += mb) {                                                \
            const int64_t m1 = m0 + mb < M ? m0 + mb : M;                                       \
            for (int64_t p = p0; p < p1; ++p) {                                                 \
                if (M == 1) {                                                                   \
                    lin_prow1(x, w, WT, p, K, N, scale, y);                                     \
                    continue;                                                                   \
                }                                                                               \
                const int64_t stored = p * K * LIN_PNR; /* the panel as stored in w */          \
                const void *pw = w;                                                             \
                int wt = WT;                                                                    \
                int64_t base = stored;                                                          \
                if (wide != NULL && m1 - m0 >= LIN_WIDEN_ROWS) {                                \
                    for (int64_t k = 0; k < K; ++k) {                                           \
                        _mm256_storeu_ps(wide + k * LIN_PNR, load_w8(w, WT, stored, k, 0));     \
                        _mm256_storeu_ps(wide + k * LIN_PNR + 8, load_w8(w, WT, stored, k, 8)); \
                    }                                                                           \
                    pw = wide, wt = LLMOS_W_F32, base = 0;                                      \
                }                                                                               \
                int64_t m = m0;                                                                 \
                if (wt == LLMOS_W_F32) {                                                        \
                    for (; m + LIN_PMR <= m1; m += LIN_PMR)                                     \
                        lin_ptile(x, x_stride, pw, LLMOS_W_F32, base, p, K, N, scale, y, m,     \
                                  LIN_PMR);                                                     \
                } else {                                                                        \
                    for (; m + LIN_PMR <= m1; m += LIN_PMR)                                     \
                        lin_ptile(x, x_stride, pw, WT, base, p, K, N, scale, y, m, LIN_PMR);    \
                }                                                                               \
                switch (m1 - m) { /* the remainder: from the panel as stored */                 \
                case 5: lin_ptile(x, x_stride, w, WT, stored, p, K, N, scale, y, m, 5); break;   \
                case 4: lin_ptile(x, x_stride, w, WT, stored, p, K, N, scale, y, m, 4); break;   \
                case 3: lin_ptile(x, x_stride, w, WT, stored, p, K, N, scale, y, m, 3); break;   \
                case 2: lin_ptile(x, x_stride, w, WT, stored, p, K, N, scale, y, m, 2); break;   \
                case 1: lin_ptile(x, x_stride, w, WT, stored, p, K, N, scale, y, m, 1); break;   \
                default: break;                                                                 \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        free(wide);                                                                             \
    }                                                                                           \
    LIN_PARALLEL(NAME)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* ---- the same products with 512-bit vectors, on CPUs with AVX-512 (the build's -march=native
 * decides): a panel of 16 outputs is one zmm, and a tile takes two neighbouring panels (two
 * weight streams) against up to LIN_ZMR rows: 24 accumulators, 2 weight vectors, x broadcast
 * from memory, of 32 zmm registers. Where the core executes 512-bit FMAs at full width this
 * doubles the multiply-adds per instruction of the 256-bit path; partial panels are masked. */
#define LLMOS_AVX512 1
#define LIN_ZMR 12

/* The 16 weights at k of the bf16 panel from element `base` (k pairs: one zmm holds k and k + 1
 * of an even k), as load_bf8; `odd` is k % 2. */
static inline __attribute__((always_inline)) __m512 load_bf16(const void *w, int64_t base,
                                                             int64_t k, const int odd) {
    const __m512i v =
        _mm512_loadu_si512((const void *)((const uint16_t *)w + base + (k >> 1) * 2 * LIN_PNR));
    return _mm512_castsi512_ps(odd ? _mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u))
                                   : _mm512_slli_epi32(v, 16));
}

/* The 16 weights at k of the panel from element `base`, as fp32. */
static inline __attribute__((always_inline)) __m512 load_w16(const void *w, int wt, int64_t base,
                                                            int64_t k) {
    const int64_t i = base + k * LIN_PNR;
    if (wt == LLMOS_W_F32) return _mm512_loadu_ps((const float *)w + i);
    if (wt == LLMOS_W_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i)));
    if (wt == LLMOS_W_BF16) return load_bf16(w, base, k, (int)(k & 1));
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + i))));
}

/* y[row, n0 .. n0 + 16) = a [* scale], the columns past N left alone */
static inline __attribute__((always_inline)) void lin_zstore(float *y, int64_t N, int64_t row,
                                                            int64_t n0, __m512 a,
                                                            const float *scale) {
    const __mmask16 mask =
        n0 + LIN_PNR <= N ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n0)) - 1u);
    if (scale != NULL) a = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(mask, scale + n0));
    _mm512_mask_storeu_ps(y + row * N + n0, mask, a);
}

/* mt (<= LIN_ZMR) rows of x from m0 against np (1 or 2; constants at each call site)
 * panels from p, panel j's weights at element bases[j] of w. */
static inline __attribute__((always_inline)) void lin_ztile(const float *x, int64_t x_stride,
                                                           const void *w, int wt,
                                                           int64_t base0, int64_t base1,
                                                           int64_t p, int64_t K, int64_t N,
                                                           const float *scale, float *y,
                                                           const int np, int64_t m0,
                                                           const int mt) {
    __m512 acc[LIN_ZMR][2];
    const float *xr = x + m0 * x_stride;
#pragma GCC unroll 12
    for (int i = 0; i < mt; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    const int64_t esize = wt == LLMOS_W_F32 ? 4 : wt == LLMOS_W_I8 ? 1 : 2;
    const char *s0 = (const char *)w + base0 * esize, *s1 = (const char *)w + base1 * esize;
    if (wt == LLMOS_W_BF16) { /* k pairs (K even): the parity of k is a constant in each half */
        for (int64_t k = 0; k < K; k += 2) {
            if (LIN_TILE_PF) { /* see LIN_PF_AHEAD */
                __builtin_prefetch(s0 + k * LIN_PNR * esize + LIN_PF_AHEAD, 0, LIN_PF_HINT);
                if (np == 2)
                    __builtin_prefetch(s1 + k * LIN_PNR * esize + LIN_PF_AHEAD, 0, LIN_PF_HINT);
            }
#pragma GCC unroll 2
            for (int e = 0; e < 2; ++e) {
                const __m512 w0 = load_bf16(w, base0, k, e);
                const __m512 w1 = np == 2 ? load_bf16(w, base1, k, e) : w0;
#pragma GCC unroll 12
                for (int i = 0; i < mt; ++i) {
                    const __m512 xb = _mm512_set1_ps(xr[i * x_stride + k + e]);
                    acc[i][0] = _mm512_fmadd_ps(xb, w0, acc[i][0]);
                    if (np == 2) acc[i][1] = _mm512_fmadd_ps(xb, w1, acc[i][1]);
                }
            }
        }
    } else {
        for (int64_t k = 0; k < K; ++k) {
            if (LIN_TILE_PF) { /* see LIN_PF_AHEAD */
                __builtin_prefetch(s0 + k * LIN_PNR * esize + LIN_PF_AHEAD, 0, LIN_PF_HINT);
                if (np == 2)
                    __builtin_prefetch(s1 + k * LIN_PNR * esize + LIN_PF_AHEAD, 0, LIN_PF_HINT);
            }
            const __m512 w0 = load_w16(w, wt, base0, k);
            const __m512 w1 = np == 2 ? load_w16(w, wt, base1, k) : w0;
#pragma GCC unroll 12
            for (int i = 0; i < mt; ++i) {
                const __m512 xb = _mm512_set1_ps(xr[i * x_stride + k]);
                acc[i][0] = _mm512_fmadd_ps(xb, w0, acc[i][0]);
                if (np == 2) acc[i][1] = _mm512_fmadd_ps(xb, w1, acc[i][1]);
            }
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < mt; ++i) {
        lin_zstore(y, N, m0 + i, p * LIN_PNR, acc[i][0], scale);
        if (np == 2) lin_zstore(y, N, m0 + i, (p + 1) * LIN_PNR, acc[i][1], scale);
    }
}

/* One row of x against np panels from p: four k phases in separate accumulators, so enough
 * FMA chains are in flight for a single row. */
static inline __attribute__((always_inline)) void lin_zrow1(const float *x, const void *w, int wt,
                                                           int64_t p, int64_t K, int64_t N,
                                                           const float *scale, float *y,
                                                           const int np) {
    __m512 a[4][2];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) a[u][0] = a[u][1] = _mm512_setzero_ps();
    const int64_t b0 = p * K * LIN_PNR, b1 = b0 + K * LIN_PNR;
    const int64_t esize = wt == LLMOS_W_F32 ? 4 : wt == LLMOS_W_I8 ? 1 : 2;
    const char *s0 = (const char *)w + b0 * esize, *s1 = (const char *)w + b1 * esize;
    const int64_t step = 4 * LIN_PNR * esize; /* bytes of a panel per 4 values of k */
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        /* why: the hardware prefetcher stops at every 4 KB page of a panel's stream; fetch
         * LIN_PF_AHEAD bytes ahead of both streams so a page's first lines are already on the
         * way (one row: the step is bound by the weights' memory traffic) */
        for (int64_t c = 0; c < step; c += 64) {
            __builtin_prefetch(s0 + k * LIN_PNR * esize + LIN_PF_AHEAD + c, 0, LIN_PF_HINT);
            if (np == 2) __builtin_prefetch(s1 + k * LIN_PNR * esize + LIN_PF_AHEAD + c, 0, LIN_PF_HINT);
        }
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) { /* k is a multiple of 4: k + u has u's parity */
            const __m512 xb = _mm512_set1_ps(x[k + u]);
            const __m512 w0 = wt == LLMOS_W_BF16 ? load_bf16(w, b0, k + u, u & 1)
                                                 : load_w16(w, wt, b0, k + u);
            a[u][0] = _mm512_fmadd_ps(xb, w0, a[u][0]);
            if (np == 2) {
                const __m512 w1 = wt == LLMOS_W_BF16 ? load_bf16(w, b1, k + u, u & 1)
                                                     : load_w16(w, wt, b1, k + u);
                a[u][1] = _mm512_fmadd_ps(xb, w1, a[u][1]);
            }
        }
    }
    for (; k < K; ++k) {
        const __m512 xb = _mm512_set1_ps(x[k]);
        a[0][0] = _mm512_fmadd_ps(xb, load_w16(w, wt, b0, k), a[0][0]);
        if (np == 2) a[0][1] = _mm512_fmadd_ps(xb, load_w16(w, wt, b1, k), a[0][1]);
    }
#pragma GCC unroll 2
    for (int j = 0; j < np; ++j)
        lin_zstore(y, N, 0, (p + j) * LIN_PNR,
                   _mm512_add_ps(_mm512_add_ps(a[0][j], a[1][j]), _mm512_add_ps(a[2][j], a[3][j])),
                   scale);
}

/* Rows [M0, M1) through FN(args..., m, mt): tiles of LIN_ZMR rows, then the remainder with mt
 * a constant at each call, as the register tiles need. */
#define LIN_ZTILES(M0, M1, FN, ...)                                                             \
    do {                                                                                        \
        int64_t m_ = M0;                                                                        \
        for (; m_ + LIN_ZMR <= (M1); m_ += LIN_ZMR) FN(__VA_ARGS__, m_, LIN_ZMR);               \
        switch ((M1) - m_) {                                                                    \
        case 11: FN(__VA_ARGS__, m_, 11); break;                                                \
        case 10: FN(__VA_ARGS__, m_, 10); break;                                                \
        case 9: FN(__VA_ARGS__, m_, 9); break;                                                  \
        case 8: FN(__VA_ARGS__, m_, 8); break;                                                  \
        case 7: FN(__VA_ARGS__, m_, 7); break;                                                  \
        case 6: FN(__VA_ARGS__, m_, 6); break;                                                  \
        case 5: FN(__VA_ARGS__, m_, 5); break;                                                  \
        case 4: FN(__VA_ARGS__, m_, 4); break;                                                  \
        case 3: FN(__VA_ARGS__, m_, 3); break;                                                  \
        case 2: FN(__VA_ARGS__, m_, 2); break;                                                  \
        case 1: FN(__VA_ARGS__, m_, 1); break;                                                  \
        default: break;                                                                         \
        }                                                                                       \
    } while (0)

/* int8 weights, 16-bit activations, integer products with 512-bit vectors: a widened panel
 * holds one k pair of all 16 outputs in one zmm, and vpdpwssd (AVX512-VNNI; else vpmaddwd +
 * vpaddd) multiplies a broadcast pair of x against it: 32 multiply-adds per instruction, twice
 * the 512-bit fp32 FMA's 16. Quantisation, the int32 chunks and the result are as in the
 * 256-bit integer path above. */
#if defined(__AVX512VNNI__)
#define LIN_ZDP(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#else
#define LIN_ZDP(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#endif

/* Twelve rows of 16-bit values (rows kp values apart, from x0) against two panels of k pairs
 * (w0; the second `wgap` bytes further) over pairs [c0, c1) of k: sums into acc (12 rows x 2
 * panels, 64 bytes each) by INSN, which multiplies pairs of 16-bit values and adds both products
 * to a 32-bit lane: vpdpwssd (int16 -> int32) or vdpbf16ps (bf16 -> fp32). Assembly for the
 * reason of lin_qkernel6 (GCC copies the accumulators of this loop every iteration): 24
 * accumulators, 2 weight vectors and 1 broadcast of the 32 zmm registers. */
#define LIN_ZROW(INSN, ADDR, A, B)                                                             \
    "vpbroadcastd " ADDR ", %%zmm26\n\t"                                                       \
    INSN " %%zmm24, %%zmm26, %%zmm" A "\n\t"                                                  \
    INSN " %%zmm25, %%zmm26, %%zmm" B "\n\t"
#define LIN_ZACC(OP, I, R) OP " " I "*64(%[acc]), %%zmm" R "\n\t"
#define LIN_ZSTORE(I, R) "vmovdqu64 %%zmm" R ", " I "*64(%[acc])\n\t"
#define LIN_ZKERNEL12(NAME, INSN)                                                                  \
static inline void NAME(const void *x0, int64_t kp, const void *w0, int64_t wgap, int64_t c0,      \
                        int64_t c1, void *acc) {                                                   \
    const char *xa = (const char *)x0 + 2 * c0, *xb = xa + 6 * kp;                                 \
    const char *xc = xa + 12 * kp, *xd = xa + 18 * kp;                                             \
    const char *w = (const char *)w0 + 32 * c0;                                                    \
    const int64_t stride = kp * 2;                                                                 \
    int64_t n = (c1 - c0) / 2;                                                                     \
    __asm__ volatile(                                                                              \
        LIN_ZACC("vmovdqu64", "0", "0") LIN_ZACC("vmovdqu64", "1", "1")                            \
        LIN_ZACC("vmovdqu64", "2", "2") LIN_ZACC("vmovdqu64", "3", "3")                            \
        LIN_ZACC("vmovdqu64", "4", "4") LIN_ZACC("vmovdqu64", "5", "5")                            \
        LIN_ZACC("vmovdqu64", "6", "6") LIN_ZACC("vmovdqu64", "7", "7")                            \
        LIN_ZACC("vmovdqu64", "8", "8") LIN_ZACC("vmovdqu64", "9", "9")                            \
        LIN_ZACC("vmovdqu64", "10", "10") LIN_ZACC("vmovdqu64", "11", "11")                        \
        LIN_ZACC("vmovdqu64", "12", "12") LIN_ZACC("vmovdqu64", "13", "13")                        \
        LIN_ZACC("vmovdqu64", "14", "14") LIN_ZACC("vmovdqu64", "15", "15")                        \
        LIN_ZACC("vmovdqu64", "16", "16") LIN_ZACC("vmovdqu64", "17", "17")                        \
        LIN_ZACC("vmovdqu64", "18", "18") LIN_ZACC("vmovdqu64", "19", "19")                        \
        LIN_ZACC("vmovdqu64", "20", "20") LIN_ZACC("vmovdqu64", "21", "21")                        \
        LIN_ZACC("vmovdqu64", "22", "22") LIN_ZACC("vmovdqu64", "23", "23")                        \
        "1:\n\t"                                                                                   \
        "vmovdqu64 (%[w]), %%zmm24\n\t"                                                            \
        "vmovdqu64 (%[w],%[gap]), %%zmm25\n\t"                                                     \
        LIN_ZROW(INSN, "(%[xa])", "0", "1")                                                        \
        LIN_ZROW(INSN, "(%[xa],%[s])", "2", "3")                                                   \
        LIN_ZROW(INSN, "(%[xa],%[s],2)", "4", "5")                                                 \
        LIN_ZROW(INSN, "(%[xb])", "6", "7")                                                        \
        LIN_ZROW(INSN, "(%[xb],%[s])", "8", "9")                                                   \
        LIN_ZROW(INSN, "(%[xb],%[s],2)", "10", "11")                                               \
        LIN_ZROW(INSN, "(%[xc])", "12", "13")                                                      \
        LIN_ZROW(INSN, "(%[xc],%[s])", "14", "15")                                                 \
        LIN_ZROW(INSN, "(%[xc],%[s],2)", "16", "17")                                               \
        LIN_ZROW(INSN, "(%[xd])", "18", "19")                                                      \
        LIN_ZROW(INSN, "(%[xd],%[s])", "20", "21")                                                 \
        LIN_ZROW(INSN, "(%[xd],%[s],2)", "22", "23")                                               \
        "add $4, %[xa]\n\t"                                                                        \
        "add $4, %[xb]\n\t"                                                                        \
        "add $4, %[xc]\n\t"                                                                        \
        "add $4, %[xd]\n\t"                                                                        \
        "add $64, %[w]\n\t"                                                                        \
        "dec %[n]\n\t"                                                                             \
        "jnz 1b\n\t"                                                                               \
        LIN_ZSTORE("0", "0") LIN_ZSTORE("1", "1") LIN_ZSTORE("2", "2")                             \
        LIN_ZSTORE("3", "3") LIN_ZSTORE("4", "4") LIN_ZSTORE("5", "5")                             \
        LIN_ZSTORE("6", "6") LIN_ZSTORE("7", "7") LIN_ZSTORE("8", "8")                             \
        LIN_ZSTORE("9", "9") LIN_ZSTORE("10", "10") LIN_ZSTORE("11", "11")                         \
        LIN_ZSTORE("12", "12") LIN_ZSTORE("13", "13") LIN_ZSTORE("14", "14")                       \
        LIN_ZSTORE("15", "15") LIN_ZSTORE("16", "16") LIN_ZSTORE("17", "17")                       \
        LIN_ZSTORE("18", "18") LIN_ZSTORE("19", "19") LIN_ZSTORE("20", "20")                       \
        LIN_ZSTORE("21", "21") LIN_ZSTORE("22", "22") LIN_ZSTORE("23", "23")                       \
        : [xa] "+r"(xa), [xb] "+r"(xb), [xc] "+r"(xc), [xd] "+r"(xd), [w] "+r"(w), [n] "+r"(n)     \
        : [s] "r"(stride), [gap] "r"(wgap), [acc] "r"(acc)                                         \
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",          \
          "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18",         \
          "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "cc",            \
          "memory");                                                                               \
}
#if defined(__AVX512VNNI__)
LIN_ZKERNEL12(lin_zqkernel12, "vpdpwssd")
#endif
#if defined(__AVX512BF16__)
LIN_ZKERNEL12(lin_zbkernel12, "vdpbf16ps")
#endif

/* mt (<= LIN_ZMR) quantised rows from xq row m against np widened panels (wq0, wq1) from p,
 * into rows y_base + m.. of y. */
static inline __attribute__((always_inline)) void lin_zqtile(const int16_t *xq, int64_t kp,
                                                            const float *sx, const int16_t *wq0,
                                                            const int16_t *wq1, int64_t p,
                                                            int64_t N, const float *scale,
                                                            float *y, int64_t y_base,
                                                            const int np, int64_t m,
                                                            const int mt) {
    __m512 f[LIN_ZMR][2];
#pragma GCC unroll 12
    for (int i = 0; i < mt; ++i) f[i][0] = f[i][1] = _mm512_setzero_ps();
    for (int64_t c0 = 0; c0 < kp; c0 += LIN_QKC) {
        const int64_t c1 = c0 + LIN_QKC < kp ? c0 + LIN_QKC : kp;
        __m512i acc[LIN_ZMR][2];
#pragma GCC unroll 12
        for (int i = 0; i < mt; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
#if defined(__AVX512VNNI__)
        if (np == 2 && mt == LIN_ZMR) {
            lin_zqkernel12(xq + m * kp, kp, wq0, (wq1 - wq0) * 2, c0, c1, acc);
        } else
#endif
        for (int64_t k = c0; k < c1; k += 2) {
            const __m512i w0 = _mm512_loadu_si512((const void *)(wq0 + k * LIN_PNR));
            const __m512i w1 =
                np == 2 ? _mm512_loadu_si512((const void *)(wq1 + k * LIN_PNR)) : w0;
#pragma GCC unroll 12
            for (int i = 0; i < mt; ++i) {
                int32_t pair;
                memcpy(&pair, xq + (m + i) * kp + k, sizeof pair);
                const __m512i xb = _mm512_set1_epi32(pair);
                acc[i][0] = LIN_ZDP(acc[i][0], xb, w0);
                if (np == 2) acc[i][1] = LIN_ZDP(acc[i][1], xb, w1);
            }
        }
#pragma GCC unroll 12
        for (int i = 0; i < mt; ++i) {
            f[i][0] = _mm512_add_ps(f[i][0], _mm512_cvtepi32_ps(acc[i][0]));
            if (np == 2) f[i][1] = _mm512_add_ps(f[i][1], _mm512_cvtepi32_ps(acc[i][1]));
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < mt; ++i) {
        const __m512 s = _mm512_set1_ps(sx[m + i]);
        lin_zstore(y, N, y_base + m + i, p * LIN_PNR, _mm512_mul_ps(f[i][0], s), scale);
        if (np == 2)
            lin_zstore(y, N, y_base + m + i, (p + 1) * LIN_PNR, _mm512_mul_ps(f[i][1], s), scale);
    }
}


/* As lin_i8q_range, panels in pairs. Returns 0 when out of memory (nothing written). */
static int lin_zq_range(const float *x, int64_t x_stride, int64_t M, const void *w, int64_t K,
                        int64_t N, const float *scale, float *y, int64_t p0, int64_t p1) {
    const int64_t kp = K + (K & 1);
    int64_t mb = (192 * 1024 / 2) / kp;
    mb -= mb % LIN_ZMR;
    if (mb < LIN_ZMR) mb = LIN_ZMR;
    if (mb > M) mb = M;
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(mb * kp));
    int16_t *wq = malloc(sizeof(int16_t) * (size_t)(2 * kp * LIN_PNR));
    float *sx = malloc(sizeof(float) * (size_t)mb);
    if (xq == NULL || wq == NULL || sx == NULL) {
        free(xq);
        free(wq);
        free(sx);
        return 0;
    }
    const int16_t *wq1 = wq + kp * LIN_PNR;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t rows = m0 + mb < M ? mb : M - m0;
        lin_quantize_rows(x + m0 * x_stride, x_stride, rows, K, kp, xq, sx);
        for (int64_t p = p0; p < p1; p += 2) {
            lin_widen_pairs((const int8_t *)w + p * K * LIN_PNR, K, kp, wq);
            if (p + 2 <= p1) {
                lin_widen_pairs((const int8_t *)w + (p + 1) * K * LIN_PNR, K, kp,
                                wq + kp * LIN_PNR);
                LIN_ZTILES(0, rows, lin_zqtile, xq, kp, sx, wq, wq1, p, N, scale, y, m0, 2);
            } else {
                LIN_ZTILES(0, rows, lin_zqtile, xq, kp, sx, wq, wq1, p, N, scale, y, m0, 1);
            }
        }
    }
    free(xq);
    free(wq);
    free(sx);
    return 1;
}

/* ---- bf16 weights x bf16-rounded rows, vdpbf16ps (AVX512_BF16): the panels are stored in k
 * pairs (lane j of a zmm holds output j's weights at k and k + 1, as for the integer path) and
 * read in place, each row of x is rounded to bf16 (nearest even) once per pass, and vdpbf16ps
 * adds both products of a pair to an fp32 lane: 32 multiply-adds per instruction, twice the fp32
 * FMA's. Each x value is then within 2^-9 of itself (relative); the products of two bf16 values
 * are exact in fp32 and the sums run in fp32. From LIN_BROWS rows, where the rounding is shared
 * by enough products to pay. */
#ifndef LIN_BROWS /* measured on Zen 4, SmolLM2-135M's shapes: at 8-11 rows these products take
                   * 0.86-0.93x the fp32 tiles' time; at 2-6 rows, about the same */
#define LIN_BROWS 8
#endif
#if defined(__AVX512BF16__)
#define LLMOS_BF16_DOT 1

/* Rows [0, rows) of x rounded to bf16 into xb (rows of K values; K is even for bf16 panels). */
static void lin_bf16_rows(const float *x, int64_t x_stride, int64_t rows, int64_t K,
                          uint16_t *xb) {
    for (int64_t m = 0; m < rows; ++m) {
        const float *xr = x + m * x_stride;
        uint16_t *br = xb + m * K;
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mask =
                k + 16 <= K ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
            const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, xr + k));
            _mm256_mask_storeu_epi16(br + k, mask, (__m256i)v);
        }
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && defined(SYS_arch_prctl)
/* ---- bf16 products on AMX tiles (the build's -march=native has AMX-BF16): the same rounded
 * rows and k-pair panels as vdpbf16ps above, but tdpbf16ps multiplies a 16 x 32 tile of x by a
 * 32 x 16 tile of weights (one panel's 16 k pairs, exactly the stored layout) into a
 * 16 x 16 fp32 tile: 16 times the multiply-adds per instruction of vdpbf16ps. Sums stay fp32,
 * so the result is the vdpbf16ps path's up to the order of the additions. Tiles 0-3 hold a
 * 32-row x 32-output block of sums, 4-5 two 16-row tiles of x, 6-7 two panels' weights. Linux
 * hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, once per process);
 * refused, the vdpbf16ps tiles run instead. Needs K a multiple of 32. */
#define LLMOS_AMX 1
#ifndef LIN_AMX_PASS_KB
#define LIN_AMX_PASS_KB 512 /* KB of rounded x per pass */
#endif

static int lin_amx_state; /* 0: not asked yet, 1: granted, -1: refused */

static int lin_amx_ready(void) {
    int s = __atomic_load_n(&lin_amx_state, __ATOMIC_ACQUIRE);
    if (s == 0) {
        /* 0x1023: ARCH_REQ_XCOMP_PERM; 18: XFEATURE_XTILEDATA (asking twice is harmless) */
        s = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
        __atomic_store_n(&lin_amx_state, s, __ATOMIC_RELEASE);
    }
    return s == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} lin_tilecfg;

static void lin_amx_begin(void) {
    lin_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}

/* One block of up to 32 rows of xb (bf16, rows of kp values; `two`: a second 16-row tile, the
 * rows past `valid` zero) against np (1 or 2) interleaved panels from p (wb0, wb1); the valid
 * rows go to rows y_row.. of y. */
static void lin_amx_block(const uint16_t *xb, int64_t kp, int64_t valid, int two,
                          const uint16_t *wb0, const uint16_t *wb1, int np, int64_t p,
                          int64_t N, float *y, int64_t y_row) {
    const int64_t xs = kp * 2; /* bytes per row of xb */
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kb = 0; kb < kp; kb += 32) {
        _tile_loadd(4, xb + kb, xs);
        _tile_loadd(6, wb0 + kb * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (np == 2) {
            _tile_loadd(7, wb1 + kb * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two) {
            _tile_loadd(5, xb + 16 * kp + kb, xs);
            _tile_dpbf16ps(2, 5, 6);
            if (np == 2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    if (valid == 32 && (p + np) * LIN_PNR <= N) { /* whole tiles: straight into y */
        float *y0 = y + y_row * N + p * LIN_PNR;
        const int64_t ys = N * 4;
        _tile_stored(0, y0, ys);
        if (np == 2) _tile_stored(1, y0 + LIN_PNR, ys);
        _tile_stored(2, y0 + 16 * N, ys);
        if (np == 2) _tile_stored(3, y0 + 16 * N + LIN_PNR, ys);
        return;
    }
    float c[32][32];
    _tile_stored(0, &c[0][0], 128);
    if (np == 2) _tile_stored(1, &c[0][16], 128);
    if (two) {
        _tile_stored(2, &c[16][0], 128);
        if (np == 2) _tile_stored(3, &c[16][16], 128);
    }
    for (int64_t r = 0; r < valid; ++r)
        for (int j = 0; j < np; ++j)
            lin_zstore(y, N, y_row + r, (p + j) * LIN_PNR, _mm512_loadu_ps(&c[r][16 * j]), NULL);
}

/* Panels [p0, p1) for every row on AMX tiles: per pass of rows (rounded to bf16 once), the
 * panels in chunks of LIN_AMX_CHUNK, each 32-row block of x in L1 while a chunk's panels stream
 * past it (from memory for the first block, from L2 for the rest). 0: out of memory (nothing
 * written). */
#ifndef LIN_AMX_CHUNK
#define LIN_AMX_CHUNK 16 /* panels: 16 x K x 32 bytes, 288 KB at K = 576 */
#endif
static int lin_amx_range(const float *x, int64_t x_stride, int64_t M, const void *w, int64_t K,
                         int64_t N, float *y, int64_t p0, int64_t p1) {
    int64_t mb = (LIN_AMX_PASS_KB * 1024 / 2) / K; /* rows per pass of rounded x */
    mb -= mb % 32;
    if (mb < 32) mb = 32;
    if (mb > M) mb = M;
    const int64_t mb16 = (mb + 15) / 16 * 16;
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(mb16 * K));
    if (xb == NULL) return 0;
    const uint16_t *wb = w;
    lin_amx_begin();
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t rows = m0 + mb < M ? mb : M - m0;
        const int64_t rows16 = (rows + 15) / 16 * 16;
        lin_bf16_rows(x + m0 * x_stride, x_stride, rows, K, xb);
        if (rows16 > rows)
            memset(xb + rows * K, 0, sizeof(uint16_t) * (size_t)((rows16 - rows) * K));
        for (int64_t c0 = p0; c0 < p1; c0 += LIN_AMX_CHUNK) {
            const int64_t c1 = c0 + LIN_AMX_CHUNK < p1 ? c0 + LIN_AMX_CHUNK : p1;
            for (int64_t m = 0; m < rows16; m += 32) {
                const int64_t valid = rows - m < 32 ? rows - m : 32;
                for (int64_t p = c0; p < c1; p += 2) {
                    const uint16_t *wb0 = wb + p * K * LIN_PNR;
                    lin_amx_block(xb + m * K, K, valid, m + 16 < rows16, wb0, wb0 + K * LIN_PNR,
                                  p + 2 <= c1 ? 2 : 1, p, N, y, m0 + m);
                }
            }
        }
    }
    _tile_release();
    free(xb);
    return 1;
}
#endif

/* mt (<= LIN_ZMR) bf16 rows from xb row m against np interleaved panels (wb0, wb1) from p,
 * into rows y_base + m.. of y. */
static inline __attribute__((always_inline)) void lin_zbtile(const uint16_t *xb, int64_t kp,
                                                            const uint16_t *wb0,
                                                            const uint16_t *wb1, int64_t p,
                                                            int64_t N, float *y, int64_t y_base,
                                                            const int np, int64_t m,
                                                            const int mt) {
    __m512 acc[LIN_ZMR][2];
#pragma GCC unroll 12
    for (int i = 0; i < mt; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    if (np == 2 && mt == LIN_ZMR) {
        lin_zbkernel12(xb + m * kp, kp, wb0, (wb1 - wb0) * 2, 0, kp, acc);
    } else {
        for (int64_t k = 0; k < kp; k += 2) {
            const __m512bh w0 = (__m512bh)_mm512_loadu_si512((const void *)(wb0 + k * 16));
            const __m512bh w1 =
                np == 2 ? (__m512bh)_mm512_loadu_si512((const void *)(wb1 + k * 16)) : w0;
#pragma GCC unroll 12
            for (int i = 0; i < mt; ++i) {
                int32_t pair;
                memcpy(&pair, xb + (m + i) * kp + k, sizeof pair);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
                if (np == 2) acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
            }
        }
    }
#pragma GCC unroll 12
    for (int i = 0; i < mt; ++i) {
        lin_zstore(y, N, y_base + m + i, p * LIN_PNR, acc[i][0], NULL);
        if (np == 2) lin_zstore(y, N, y_base + m + i, (p + 1) * LIN_PNR, acc[i][1], NULL);
    }
}


/* The bf16 products over panels [p0, p1) for all M rows (K even), in passes of ~192 KB of bf16
 * rows, panels in pairs. Returns 0 when out of memory (nothing written). */
static int lin_zb_range(const float *x, int64_t x_stride, int64_t M, const void *w, int64_t K,
                        int64_t N, float *y, int64_t p0, int64_t p1) {
#if defined(LLMOS_AMX)
    if (K % 32 == 0 && lin_amx_ready() && lin_amx_range(x, x_stride, M, w, K, N, y, p0, p1))
        return 1;
#endif
    int64_t mb = (192 * 1024 / 2) / K;
    mb -= mb % LIN_ZMR;
    if (mb < LIN_ZMR) mb = LIN_ZMR;
    if (mb > M) mb = M;
    uint16_t *xb = malloc(sizeof(uint16_t) * (size_t)(mb * K));
    if (xb == NULL) return 0;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t rows = m0 + mb < M ? mb : M - m0;
        lin_bf16_rows(x + m0 * x_stride, x_stride, rows, K, xb);
        for (int64_t p = p0; p < p1; p += 2) {
            const uint16_t *wb = (const uint16_t *)w + p * K * LIN_PNR, *wb1 = wb + K * LIN_PNR;
            if (p + 2 <= p1)
                LIN_ZTILES(0, rows, lin_zbtile, xb, K, wb, wb1, p, N, y, m0, 2);
            else
                LIN_ZTILES(0, rows, lin_zbtile, xb, K, wb, wb1, p, N, y, m0, 1);
        }
    }
    free(xb);
    return 1;
}
#endif

/* The bf16 dot-product path where this build has it (AVX512_BF16): 1 when it computed y. */
static inline int lin_zb_try(const float *x, int64_t x_stride, int64_t M, const void *w,
                             int64_t K, int64_t N, float *y, int64_t p0, int64_t p1) {
#if defined(LLMOS_BF16_DOT)
    return M >= LIN_BROWS && lin_zb_range(x, x_stride, M, w, K, N, y, p0, p1);
#else
    (void)x, (void)x_stride, (void)M, (void)w, (void)K, (void)N, (void)y, (void)p0, (void)p1;
    return 0;
#endif
}

/* As LIN_PDEFINE, with the 512-bit tiles: panels go in pairs (the last of an odd range alone);
 * fp16/int8 panels are widened to fp32 once per pass when the pass has enough rows. */
#define LIN_ZDEFINE(NAME, WT)                                                                   \
    static void NAME##_range(const float *x, int64_t x_stride, int64_t M, const void *w,        \
                             int64_t K, int64_t N, const float *scale, float *y, int64_t p0,    \
                             int64_t p1) {                                                      \
        if (WT == LLMOS_W_I8 && M >= LIN_QROWS &&                                               \
            lin_zq_range(x, x_stride, M, w, K, N, scale, y, p0, p1))                            \
            return;                                                                             \
        if (WT == LLMOS_W_BF16 && lin_zb_try(x, x_stride, M, w, K, N, y, p0, p1)) return;        \
        if (M == 1) {                                                                           \
            int64_t p = p0;                                                                     \
            for (; p + 2 <= p1; p += 2) lin_zrow1(x, w, WT, p, K, N, scale, y, 2);              \
            if (p < p1) lin_zrow1(x, w, WT, p, K, N, scale, y, 1);                              \
            return;                                                                             \
        }                                                                                       \
        int64_t mb = (192 * 1024 / 4) / (K > 0 ? K : 1); /* rows per pass: ~192 KB of x */     \
        mb -= mb % LIN_ZMR;                                                                     \
        if (mb < LIN_ZMR) mb = LIN_ZMR;                                                         \
        float *wide = WT != LLMOS_W_F32 && M >= LIN_WIDEN_ROWS                                  \
                          ? malloc(sizeof(float) * (size_t)(2 * K * LIN_PNR))                   \
                          : NULL;                                                               \
        for (int64_t m0 = 0; m0 < M; m0 += mb) {                                                \
            const int64_t m1 = m0 + mb < M ? m0 + mb : M;                                       \
            for (int64_t p = p0; p < p1; p += 2) {                                              \
                const int np = p + 2 <= p1 ? 2 : 1;                                             \
                const int64_t stored = p * K * LIN_PNR; /* the panels as stored in w */         \
                if (wide != NULL && m1 - m0 >= LIN_WIDEN_ROWS) {                                \
                    for (int64_t k = 0; k < np * K; ++k) /* both panels: K is even for bf16 */  \
                        _mm512_storeu_ps(wide + k * LIN_PNR, load_w16(w, WT, stored, k));       \
                    if (np == 2)                                                                \
                        LIN_ZTILES(m0, m1, lin_ztile, x, x_stride, wide, LLMOS_W_F32, 0,        \
                            K * LIN_PNR, p, K, N, scale, y, 2);                                 \
                    else                                                                        \
                        LIN_ZTILES(m0, m1, lin_ztile, x, x_stride, wide, LLMOS_W_F32, 0, 0, p,  \
                            K, N, scale, y, 1);                                                 \
                } else if (np == 2) {                                                           \
                    LIN_ZTILES(m0, m1, lin_ztile, x, x_stride, w, WT, stored,                   \
                        stored + K * LIN_PNR, p, K, N, scale, y, 2);                            \
                } else {                                                                        \
                    LIN_ZTILES(m0, m1, lin_ztile, x, x_stride, w, WT, stored, stored, p, K, N,  \
                        scale, y, 1);                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        free(wide);                                                                             \
    }                                                                                           \
    LIN_PARALLEL(NAME)
LIN_ZDEFINE(lin_f32, LLMOS_W_F32)
LIN_ZDEFINE(lin_f16, LLMOS_W_F16)
LIN_ZDEFINE(lin_i8, LLMOS_W_I8)
LIN_ZDEFINE(lin_bf16, LLMOS_W_BF16)
#else
LIN_PDEFINE(lin_f32, LLMOS_W_F32)
LIN_PDEFINE(lin_f16, LLMOS_W_F16)
LIN_PDEFINE(lin_i8, LLMOS_W_I8)
LIN_PDEFINE(lin_bf16, LLMOS_W_BF16)
#endif

/* ---- weights in blocks of 32 values of k, as GGUF stores them, each block with an fp16 scale d
 * per output row:
 *   LLMOS_W_Q4  Q4_1: w = d * q + m, q in 0..15 and an fp16 minimum m per row and block too
 *   LLMOS_W_Q8  Q8_0: w = d * q, q in -127..127
 * Panel p holds K / 32 blocks of lin_blk_bytes(kind) bytes each, at byte (p * K / 32 + b) times
 * that: the 16 rows' d, then (Q4_1) their m, then the values: Q4_1, for each k pair j (0..15)
 * one byte per row r with q[r][2j] in its low and q[r][2j + 1] in its high nibble; Q8_0, for
 * each k (0..31) one int8 per row. K must be a multiple of 32, at most LIN_BLK_MAX_K.
 * Up to LIN_BLK_WIDE_ROWS rows: per block, sum_k x_k q_k in fp32 (q is exact in fp32), then
 * d * that (+ m * sum_k x_k): the dequantised weights are never formed, and a step reads 5 (Q4_1)
 * or 8.5 (Q8_0) bits per weight; with 512-bit vectors, tiles of up to LIN_BLK_MR rows share each
 * block's conversion of q to floats. More rows: each panel is dequantised to fp32 once per pass
 * into an L2-resident buffer and multiplied by the fp32 tiles. */
#define LIN_BLK_MAX_K 65536
/* Rows of x from which panels are dequantised for the fp32 tiles, measured on SmolLM2's shapes
 * (30 layers of 4-bit weights). 512-bit: the 4-bit tiles took half the time of the fp32 path
 * at 16 rows (which writes 4 bytes per weight into its buffer every call), the same at 96, 5 %
 * more at 256. 256-bit (row by row below it): 4.5 against 9.2 ms at 2 rows, 8.0 / 13.2 at 4,
 * even at 8, 29 / 24 at 16. */
#if defined(LLMOS_AVX512)
#define LIN_BLK_WIDE_ROWS 96
#else
#define LIN_BLK_WIDE_ROWS 8
#endif

static inline int64_t lin_blk_bytes(int kind) { return kind == LLMOS_W_Q4 ? 320 : 544; }

/* xs[b] = the sum of x[32b .. 32b + 31] */
static inline void lin_blk_xsums(const float *x, int64_t K, float *xs) {
    for (int64_t b = 0; b < K / 32; ++b) {
        __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(x + 32 * b),
                                               _mm256_loadu_ps(x + 32 * b + 8)),
                                 _mm256_add_ps(_mm256_loadu_ps(x + 32 * b + 16),
                                               _mm256_loadu_ps(x + 32 * b + 24)));
        xs[b] = hsum8(s);
    }
}

/* The q of k pair j of a block as floats, 8 rows from row 8h: k = 2j (even) and 2j + 1 (odd). */
static inline __attribute__((always_inline)) void lin_blk_pair8(const uint8_t *blk, int kind,
                                                               int j, int h, __m256 *even,
                                                               __m256 *odd) {
    if (kind == LLMOS_W_Q4) {
        const __m128i raw = _mm_loadl_epi64((const __m128i *)(blk + 64 + 16 * j + 8 * h));
        const __m256i v = _mm256_cvtepu8_epi32(raw);
        *even = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
        *odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
    } else {
        const uint8_t *v = blk + 32 + 32 * j + 8 * h;
        *even = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)v)));
        *odd = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v + 16))));
    }
}

/* Panel p dequantised to fp32 in the packed fp32 layout: dst[k * 16 + r]. why always_inline:
 * as a function of its own, GCC 12.2 at -O3 cloned it for the 8-bit kind (IPA-CP) and the clone
 * wrote garbage (-O2 and -fno-ipa-cp-clone were right); inlined, each caller has kind constant. */
static inline __attribute__((always_inline)) void lin_blk_widen(const uint8_t *w, int kind,
                                                               int64_t p, int64_t K, float *dst) {
    const int64_t kb = K / 32, bytes = lin_blk_bytes(kind);
    const uint8_t *blk = w + p * kb * bytes;
    for (int64_t b = 0; b < kb; ++b, blk += bytes) {
        float *o = dst + b * 32 * LIN_PNR;
        for (int h = 0; h < 2; ++h) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * h)));
            const __m256 m = kind == LLMOS_W_Q4
                                 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * h)))
                                 : _mm256_setzero_ps();
            for (int j = 0; j < 16; ++j) {
                __m256 even, odd;
                lin_blk_pair8(blk, kind, j, h, &even, &odd);
                _mm256_storeu_ps(o + 32 * j + 8 * h, _mm256_fmadd_ps(d, even, m));
                _mm256_storeu_ps(o + 32 * j + 16 + 8 * h, _mm256_fmadd_ps(d, odd, m));
            }
        }
    }
}

#if defined(LLMOS_AVX512)
#define LIN_BLK_MR 4 /* rows of x per block tile: 2 x 2 x 4 block sums + 2 x 4 totals in zmm */

/* As lin_blk_pair8, all 16 rows. */
static inline __attribute__((always_inline)) void lin_blk_pair16(const uint8_t *blk, int kind,
                                                                int j, __m512 *even,
                                                                __m512 *odd) {
    if (kind == LLMOS_W_Q4) {
        const __m512i v =
            _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(blk + 64 + 16 * j)));
        *even = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
        *odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
    } else {
        const uint8_t *v = blk + 32 + 32 * j;
        *even = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)v)));
        *odd = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(v + 16))));
    }
}

/* t += d * a (+ m * s): a block's sums scaled into a panel's totals */
static inline __attribute__((always_inline)) __m512 lin_blk_scale16(const uint8_t *blk, int kind,
                                                                   __m512 a, float s, __m512 t) {
    t = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)blk)), a, t);
    if (kind == LLMOS_W_Q4)
        t = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 32))),
                            _mm512_set1_ps(s), t);
    return t;
}

/* mt (<= LIN_BLK_MR) rows of x from m0 against np (1 or 2) panels from p, both constants at each
 * call; xs (mt, K / 32) the rows' block sums (Q4_1). Per block and k pair the values are turned
 * into floats once for all the rows. */
static inline __attribute__((always_inline)) void lin_blk_tile(const float *x, int64_t x_stride,
                                                              const float *xs, const uint8_t *w,
                                                              int kind, int64_t p, int64_t K,
                                                              int64_t N, float *y, const int np,
                                                              int64_t m0, const int mt) {
    const int64_t kb = K / 32, bytes = lin_blk_bytes(kind);
    const uint8_t *base[2] = {w + p * kb * bytes, w + (p + 1) * kb * bytes};
    const float *xr = x + m0 * x_stride;
    __m512 t[LIN_BLK_MR][2];
#pragma GCC unroll 4
    for (int r = 0; r < mt; ++r) t[r][0] = t[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < kb; ++b) {
        __m512 a[LIN_BLK_MR][2][2]; /* [row][panel][even, odd k]: block sums of x * q */
#pragma GCC unroll 2
        for (int i = 0; i < np; ++i) {
            const char *blk = (const char *)base[i] + b * bytes;
            for (int c = 0; c < bytes; c += 64) /* see LIN_PF_AHEAD */
                __builtin_prefetch(blk + LIN_PF_AHEAD + c, 0, LIN_PF_HINT);
        }
#pragma GCC unroll 4
        for (int r = 0; r < mt; ++r)
            a[r][0][0] = a[r][0][1] = a[r][1][0] = a[r][1][1] = _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int j = 0; j < 16; ++j) {
            __m512 even[2], odd[2];
#pragma GCC unroll 2
            for (int i = 0; i < np; ++i)
                lin_blk_pair16(base[i] + b * bytes, kind, j, &even[i], &odd[i]);
#pragma GCC unroll 4
            for (int r = 0; r < mt; ++r) {
                const float *xk = xr + r * x_stride + 32 * b + 2 * j;
                const __m512 xe = _mm512_set1_ps(xk[0]), xo = _mm512_set1_ps(xk[1]);
#pragma GCC unroll 2
                for (int i = 0; i < np; ++i) {
                    a[r][i][0] = _mm512_fmadd_ps(xe, even[i], a[r][i][0]);
                    a[r][i][1] = _mm512_fmadd_ps(xo, odd[i], a[r][i][1]);
                }
            }
        }
#pragma GCC unroll 2
        for (int i = 0; i < np; ++i)
#pragma GCC unroll 4
            for (int r = 0; r < mt; ++r)
                t[r][i] = lin_blk_scale16(base[i] + b * bytes, kind,
                                          _mm512_add_ps(a[r][i][0], a[r][i][1]),
                                          kind == LLMOS_W_Q4 ? xs[r * kb + b] : 0.0f, t[r][i]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < mt; ++r)
#pragma GCC unroll 2
        for (int i = 0; i < np; ++i) lin_zstore(y, N, m0 + r, (p + i) * LIN_PNR, t[r][i], NULL);
}

/* One row of x against np (1 or 2, a constant at each call) panels from p; xs its block sums
 * (Q4_1). Two accumulators per k parity and panel: 8 FMA chains, as one row needs. */
static inline __attribute__((always_inline)) void lin_blk_row1(const float *x, const float *xs,
                                                              const uint8_t *w, int kind,
                                                              int64_t p, int64_t K, int64_t N,
                                                              float *y, const int np) {
    const int64_t kb = K / 32, bytes = lin_blk_bytes(kind);
    const uint8_t *base[2] = {w + p * kb * bytes, w + (p + 1) * kb * bytes};
    __m512 t[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t b = 0; b < kb; ++b) {
        const float *xb = x + 32 * b;
        __m512 a[2][2][2]; /* [panel][j parity][even, odd k] */
#pragma GCC unroll 2
        for (int i = 0; i < np; ++i) {
            const char *blk = (const char *)base[i] + b * bytes;
            for (int c = 0; c < bytes; c += 64) /* see LIN_BLK_PF_AHEAD */
                __builtin_prefetch(blk + LIN_BLK_PF_AHEAD + c, 0, LIN_BLK_PF_HINT);
            a[i][0][0] = a[i][0][1] = a[i][1][0] = a[i][1][1] = _mm512_setzero_ps();
        }
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
            const __m512 xe = _mm512_set1_ps(xb[2 * j]), xo = _mm512_set1_ps(xb[2 * j + 1]);
#pragma GCC unroll 2
            for (int i = 0; i < np; ++i) {
                __m512 even, odd;
                lin_blk_pair16(base[i] + b * bytes, kind, j, &even, &odd);
                a[i][j & 1][0] = _mm512_fmadd_ps(xe, even, a[i][j & 1][0]);
                a[i][j & 1][1] = _mm512_fmadd_ps(xo, odd, a[i][j & 1][1]);
            }
        }
#pragma GCC unroll 2
        for (int i = 0; i < np; ++i)
            t[i] = lin_blk_scale16(base[i] + b * bytes, kind,
                                   _mm512_add_ps(_mm512_add_ps(a[i][0][0], a[i][0][1]),
                                                 _mm512_add_ps(a[i][1][0], a[i][1][1])),
                                   kind == LLMOS_W_Q4 ? xs[b] : 0.0f, t[i]);
    }
#pragma GCC unroll 2
    for (int i = 0; i < np; ++i) lin_zstore(y, N, 0, (p + i) * LIN_PNR, t[i], NULL);
}


#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && !defined(LLMOS_NO_BLOCK_VNNI)
/* One row against block weights in integers (VNNI): x is quantised per block of 32 to 16-bit
 * q = round(x * 32512 / max|x_block|), split exactly as q = 256 * h + l (h, l int8), and
 * vpdpbusd sums the unsigned 4-bit (Q4_1) or offset 8-bit (Q8_0: q + 128, the 128 * sum(q)
 * taken off per block) weights against h and l in int32: per block sum_k q_w * q_x, exact, then
 * d * that * s_x (+ m * sum_k x_k, with the exact x). Why: the fp32 path turns every weight into
 * a float and spends an FMA on it, compute bound at 10-12 GB/s; here 64 bytes of weights take a
 * byte transpose, one or two masks and two or four vpdpbusd. Measured on a 2-core Zen 4, one row
 * against a 49152 x 576 weight, 2 threads: 4-bit 0.55-0.70 against 1.47-1.55 ms; 8-bit about
 * the same (1.86-2.05 ms, bound by something other than its arithmetic); SmolLM2's int4 decode
 * step in-process 6.9 against 7.4 ms. The cost: each x is off by at most half of 1/32512 of its
 * block's largest magnitude (the int8 path's 16-bit rows, per block instead of per row). */
#define LIN_BLK_VNNI 1
#define LIN_BLK_XLEVELS 32512.0f /* 127 * 256: h = (q + 128) >> 8 stays in -127..127 */

/* vpermb index: 64 bytes holding 4 groups (k pairs j, Q4_1; k values, Q8_0) of 16 rows, byte
 * 16 g + r, into 16 lanes of 4: lane r holds row r's bytes of the 4 groups in order. */
static inline __m512i lin_blk_transpose_index(void) {
    uint8_t idx[64];
    for (int r = 0; r < 16; ++r)
        for (int g = 0; g < 4; ++g) idx[4 * r + g] = (uint8_t)(16 * g + r);
    return _mm512_loadu_si512(idx);
}

/* One row x of K values quantised per block b: xv[64 b ..] the int8 halves h and l in the order
 * lin_blk_vrow1 broadcasts them as 32-bit groups, sx[b] the step (max|x_block| / 32512, 0 for a
 * block with no |x| above 1e-30, whose q are all 0), qs[b] = sum of the block's q.
 * Q4_1 (a weight lane holds the low or high nibbles of 4 k pairs: k = 8 g + 2 i, + 1): per
 * group g of 8 k, h of the even k, h of the odd k, l even, l odd. Q8_0 (a lane holds 4 k in
 * order): per group of 4 k, h then l. */
static void lin_blk_xquant(const float *x, int64_t K, int kind, int8_t *xv, float *sx,
                           int32_t *qs) {
    uint8_t idx[64]; /* source byte (h of k: k, l of k: 32 + k) of each byte of a block */
    for (int o = 0; o < 64; ++o) {
        int k, low;
        if (kind == LLMOS_W_Q4) { /* o = 16 g + 4 part + i; part: h even, h odd, l even, l odd */
            const int g = o / 16, part = (o / 4) % 4, i = o % 4;
            k = 8 * g + 2 * i + (part & 1);
            low = part >= 2;
        } else { /* o = 8 g + 4 part + i; part: h, l */
            const int g = o / 8, part = (o / 4) % 2, i = o % 4;
            k = 4 * g + i;
            low = part;
        }
        idx[o] = (uint8_t)(k + 32 * low);
    }
    const __m512i perm = _mm512_loadu_si512(idx);
    const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int64_t b = 0; b < K / 32; ++b) {
        const __m512 a0 = _mm512_loadu_ps(x + 32 * b), a1 = _mm512_loadu_ps(x + 32 * b + 16);
        const float amax = _mm512_reduce_max_ps(
            _mm512_max_ps(_mm512_and_ps(a0, abs_mask), _mm512_and_ps(a1, abs_mask)));
        /* why the floor: 32512 / max|x| must stay finite; a block that small is taken as zero */
        const float inv = amax > 1e-30f ? LIN_BLK_XLEVELS / amax : 0.0f;
        sx[b] = inv > 0.0f ? amax / LIN_BLK_XLEVELS : 0.0f;
        const __m512 vi = _mm512_set1_ps(inv);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, vi)); /* nearest, ties even */
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, vi));
        const __m512i c = _mm512_set1_epi32(128);
        const __m512i h0 = _mm512_srai_epi32(_mm512_add_epi32(q0, c), 8);
        const __m512i h1 = _mm512_srai_epi32(_mm512_add_epi32(q1, c), 8);
        const __m512i l0 = _mm512_sub_epi32(q0, _mm512_slli_epi32(h0, 8));
        const __m512i l1 = _mm512_sub_epi32(q1, _mm512_slli_epi32(h1, 8));
        qs[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        __m512i bytes = _mm512_castsi128_si512(_mm512_cvtepi32_epi8(h0));
        bytes = _mm512_inserti32x4(bytes, _mm512_cvtepi32_epi8(h1), 1);
        bytes = _mm512_inserti32x4(bytes, _mm512_cvtepi32_epi8(l0), 2);
        bytes = _mm512_inserti32x4(bytes, _mm512_cvtepi32_epi8(l1), 3);
        _mm512_storeu_si512(xv + 64 * b, _mm512_permutexvar_epi8(perm, bytes));
    }
}

/* As lin_blk_row1, on x quantised by lin_blk_xquant; xs the exact block sums (Q4_1's m), tr
 * lin_blk_transpose_index(). Per panel four int32 accumulators (Q4_1: h and l against the low
 * and the high nibbles, the high ones left in place, 16 times their value; Q8_0: h and l, two
 * groups apart). */
static inline __attribute__((always_inline)) void lin_blk_vrow1(const int8_t *xv, const float *sx,
                                                               const int32_t *qs, const float *xs,
                                                               const __m512i tr, const uint8_t *w,
                                                               int kind, int64_t p, int64_t K,
                                                               int64_t N, float *y, const int np) {
    const int64_t kb = K / 32, bytes = lin_blk_bytes(kind);
    const uint8_t *base[2] = {w + p * kb * bytes, w + (p + 1) * kb * bytes};
    const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8((char)0xF0);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 t[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t b = 0; b < kb; ++b) {
        const int32_t *xd = (const int32_t *)(xv + 64 * b);
        __m512i a[2][4];
#pragma GCC unroll 2
        for (int i = 0; i < np; ++i) {
            const char *blk = (const char *)base[i] + b * bytes;
            for (int c = 0; c < bytes; c += 64) /* see LIN_BLK_PF_AHEAD */
                __builtin_prefetch(blk + LIN_BLK_PF_AHEAD + c, 0, LIN_BLK_PF_HINT);
            a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm512_setzero_si512();
        }
        __m512i s[2];
        if (kind == LLMOS_W_Q4) {
#pragma GCC unroll 4
            for (int g = 0; g < 4; ++g) {
                const __m512i he = _mm512_set1_epi32(xd[4 * g]);
                const __m512i ho = _mm512_set1_epi32(xd[4 * g + 1]);
                const __m512i le = _mm512_set1_epi32(xd[4 * g + 2]);
                const __m512i lo = _mm512_set1_epi32(xd[4 * g + 3]);
#pragma GCC unroll 2
                for (int i = 0; i < np; ++i) {
                    const __m512i v = _mm512_permutexvar_epi8(
                        tr, _mm512_loadu_si512(base[i] + b * bytes + 64 + 64 * g));
                    const __m512i wl = _mm512_and_si512(v, lo4), wh = _mm512_and_si512(v, hi4);
                    a[i][0] = _mm512_dpbusd_epi32(a[i][0], wl, he);
                    a[i][1] = _mm512_dpbusd_epi32(a[i][1], wh, ho);
                    a[i][2] = _mm512_dpbusd_epi32(a[i][2], wl, le);
                    a[i][3] = _mm512_dpbusd_epi32(a[i][3], wh, lo);
                }
            }
#pragma GCC unroll 2
            for (int i = 0; i < np; ++i) /* 256 h + l; the high nibbles' sums are 16 times */
                s[i] = _mm512_add_epi32(
                    _mm512_slli_epi32(_mm512_add_epi32(a[i][0], _mm512_srai_epi32(a[i][1], 4)),
                                      8),
                    _mm512_add_epi32(a[i][2], _mm512_srai_epi32(a[i][3], 4)));
        } else {
#pragma GCC unroll 8
            for (int g = 0; g < 8; ++g) {
                const __m512i h = _mm512_set1_epi32(xd[2 * g]);
                const __m512i l = _mm512_set1_epi32(xd[2 * g + 1]);
#pragma GCC unroll 2
                for (int i = 0; i < np; ++i) {
                    const __m512i v = _mm512_xor_si512(
                        _mm512_permutexvar_epi8(
                            tr, _mm512_loadu_si512(base[i] + b * bytes + 32 + 64 * g)),
                        flip);
                    a[i][2 * (g & 1)] = _mm512_dpbusd_epi32(a[i][2 * (g & 1)], v, h);
                    a[i][2 * (g & 1) + 1] = _mm512_dpbusd_epi32(a[i][2 * (g & 1) + 1], v, l);
                }
            }
#pragma GCC unroll 2
            for (int i = 0; i < np; ++i) /* 256 h + l, less the 128 added to every weight */
                s[i] = _mm512_sub_epi32(
                    _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(a[i][0], a[i][2]), 8),
                                     _mm512_add_epi32(a[i][1], a[i][3])),
                    _mm512_set1_epi32(128 * qs[b]));
        }
#pragma GCC unroll 2
        for (int i = 0; i < np; ++i)
            t[i] = lin_blk_scale16(base[i] + b * bytes, kind,
                                   _mm512_mul_ps(_mm512_cvtepi32_ps(s[i]), _mm512_set1_ps(sx[b])),
                                   kind == LLMOS_W_Q4 ? xs[b] : 0.0f, t[i]);
    }
#pragma GCC unroll 2
    for (int i = 0; i < np; ++i) lin_zstore(y, N, 0, (p + i) * LIN_PNR, t[i], NULL);
}
/* lin_blk_xquant's output for one row of kb blocks, in a buffer per thread kept between calls
 * (as lin_blk_range's wide_buf) and grown when a larger K needs it: kb * 64 bytes of halves,
 * then kb steps and kb sums. NULL when it cannot be had (then the fp32 path runs). */
static int8_t *lin_blk_vbuf(int64_t kb) {
    static __thread int8_t *buf = NULL;
    static __thread int64_t blocks = 0;
    if (kb > blocks) {
        free(buf);
        buf = malloc((size_t)kb * (64 + sizeof(float) + sizeof(int32_t)));
        blocks = buf != NULL ? kb : 0;
    }
    return buf;
}
#endif

/* Rows [m0, m0 + mt) against panels [p0, p1), in pairs (the last of an odd range alone). */
static inline __attribute__((always_inline)) void lin_blk_rows(const float *x, int64_t x_stride,
                                                              const float *xs, const uint8_t *w,
                                                              int kind, int64_t p0, int64_t p1,
                                                              int64_t K, int64_t N, float *y,
                                                              int64_t m0, const int mt) {
    int64_t p = p0;
    if (mt == 1) { /* why apart: one row needs more FMA chains per panel than a tile has */
        const float *xr = x + m0 * x_stride;
        for (; p + 2 <= p1; p += 2) lin_blk_row1(xr, xs, w, kind, p, K, N, y + m0 * N, 2);
        if (p < p1) lin_blk_row1(xr, xs, w, kind, p, K, N, y + m0 * N, 1);
        return;
    }
    for (; p + 2 <= p1; p += 2) lin_blk_tile(x, x_stride, xs, w, kind, p, K, N, y, 2, m0, mt);
    if (p < p1) lin_blk_tile(x, x_stride, xs, w, kind, p, K, N, y, 1, m0, mt);
}
#else
/* One row of x against panel p; xs its block sums (Q4_1). */
static inline __attribute__((always_inline)) void lin_blk_row1(const float *x, const float *xs,
                                                              const uint8_t *w, int kind,
                                                              int64_t p, int64_t K, int64_t N,
                                                              float *y) {
    const int64_t kb = K / 32, bytes = lin_blk_bytes(kind);
    const uint8_t *base = w + p * kb * bytes;
    __m256 t[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < kb; ++b) {
        const float *xb = x + 32 * b;
        const uint8_t *blk = base + b * bytes;
        __m256 a[2][4]; /* [j parity][rows 0-7 even k, 8-15 even, 0-7 odd, 8-15 odd] */
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) a[0][u] = a[1][u] = _mm256_setzero_ps();
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
            const __m256 xe = _mm256_broadcast_ss(xb + 2 * j);
            const __m256 xo = _mm256_broadcast_ss(xb + 2 * j + 1);
            __m256 *acc = a[j & 1];
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) {
                __m256 even, odd;
                lin_blk_pair8(blk, kind, j, h, &even, &odd);
                acc[h] = _mm256_fmadd_ps(xe, even, acc[h]);
                acc[2 + h] = _mm256_fmadd_ps(xo, odd, acc[2 + h]);
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const __m256 dot = _mm256_add_ps(_mm256_add_ps(a[0][h], a[0][2 + h]),
                                             _mm256_add_ps(a[1][h], a[1][2 + h]));
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 16 * h)));
            t[h] = _mm256_fmadd_ps(d, dot, t[h]);
            if (kind == LLMOS_W_Q4)
                t[h] = _mm256_fmadd_ps(
                    _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 32 + 16 * h))),
                    _mm256_set1_ps(xs[b]), t[h]);
        }
    }
    lin_panel_store(y, N, 0, p * LIN_PNR, t[0], t[1], NULL);
}
#endif

/* Panels [p0, p1) of a block-quantised weight against every row of x (as the other types'
 * _range); kind LLMOS_W_Q4 or LLMOS_W_Q8, a constant at each call. */
static inline __attribute__((always_inline)) void lin_blk_range(const float *x, int64_t x_stride,
                                                               int64_t M, const uint8_t *w,
                                                               int kind, int64_t K, int64_t N,
                                                               float *y, int64_t p0, int64_t p1) {
    /* the dequantised panels, where rows are many enough to repay writing them: a buffer per
     * thread, kept between calls and grown when a larger K needs it (why not malloc per call:
     * past glibc's mmap threshold of 128 KB every call would map and unmap it). Two panels:
     * the 512-bit tiles take panel pairs */
    static __thread float *wide_buf = NULL;
    static __thread size_t wide_cap = 0;
    const size_t need = (size_t)(2 * K * LIN_PNR);
    const int widen = M >= LIN_BLK_WIDE_ROWS;
    if (widen && need > wide_cap) {
        free(wide_buf);
        wide_buf = malloc(sizeof(float) * need);
        wide_cap = wide_buf != NULL ? need : 0;
    }
    float *wide = widen ? wide_buf : NULL;
#if defined(LLMOS_AVX512)
    if (wide == NULL) { /* tiles of LIN_BLK_MR rows, nothing formed */
        const int64_t kb = K / 32;
        float xs[LIN_BLK_MR * (LIN_BLK_MAX_K / 32)];
        for (int64_t m0 = 0; m0 < M; m0 += LIN_BLK_MR) {
            const int64_t mt = M - m0 < LIN_BLK_MR ? M - m0 : LIN_BLK_MR;
            if (kind == LLMOS_W_Q4)
                for (int64_t r = 0; r < mt; ++r)
                    lin_blk_xsums(x + (m0 + r) * x_stride, K, xs + r * kb);
#if defined(LIN_BLK_VNNI)
            int8_t *xv = mt == 1 ? lin_blk_vbuf(kb) : NULL;
            if (xv != NULL) {
                float *sx = (float *)(xv + 64 * kb);
                int32_t *qs = (int32_t *)(sx + kb);
                const __m512i tr = lin_blk_transpose_index();
                lin_blk_xquant(x + m0 * x_stride, K, kind, xv, sx, qs);
                float *yr = y + m0 * N;
                int64_t p = p0;
                for (; p + 2 <= p1; p += 2)
                    lin_blk_vrow1(xv, sx, qs, xs, tr, w, kind, p, K, N, yr, 2);
                if (p < p1) lin_blk_vrow1(xv, sx, qs, xs, tr, w, kind, p, K, N, yr, 1);
                continue;
            }
#endif
            switch (mt) {
            case 4: lin_blk_rows(x, x_stride, xs, w, kind, p0, p1, K, N, y, m0, 4); break;
            case 3: lin_blk_rows(x, x_stride, xs, w, kind, p0, p1, K, N, y, m0, 3); break;
            case 2: lin_blk_rows(x, x_stride, xs, w, kind, p0, p1, K, N, y, m0, 2); break;
            default: lin_blk_rows(x, x_stride, xs, w, kind, p0, p1, K, N, y, m0, 1); break;
            }
        }
        return;
    }
    int64_t mb = (192 * 1024 / 4) / K; /* rows per pass: ~192 KB of x */
    mb -= mb % LIN_ZMR;
    if (mb < LIN_ZMR) mb = LIN_ZMR;
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t m1 = m0 + mb < M ? m0 + mb : M;
        for (int64_t p = p0; p < p1; p += 2) {
            lin_blk_widen(w, kind, p, K, wide);
            if (p + 2 <= p1) {
                lin_blk_widen(w, kind, p + 1, K, wide + K * LIN_PNR);
                LIN_ZTILES(m0, m1, lin_ztile, x, x_stride, wide, LLMOS_W_F32, 0, K * LIN_PNR, p,
                           K, N, NULL, y, 2);
            } else {
                LIN_ZTILES(m0, m1, lin_ztile, x, x_stride, wide, LLMOS_W_F32, 0, 0, p, K, N,
                           NULL, y, 1);
            }
        }
    }
#else
    if (wide == NULL) { /* one row (or no memory for the buffer): row by row, nothing formed */
        float xs[LIN_BLK_MAX_K / 32];
        for (int64_t r = 0; r < M; ++r) {
            if (kind == LLMOS_W_Q4) lin_blk_xsums(x + r * x_stride, K, xs);
            for (int64_t p = p0; p < p1; ++p)
                lin_blk_row1(x + r * x_stride, xs, w, kind, p, K, N, y + r * N);
        }
        return;
    }
    const int64_t mb = lin_row_block(K);
    for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t m1 = m0 + mb < M ? m0 + mb : M;
        for (int64_t p = p0; p < p1; ++p) {
            lin_blk_widen(w, kind, p, K, wide);
            int64_t m = m0;
            for (; m + LIN_PMR <= m1; m += LIN_PMR)
                lin_ptile(x, x_stride, wide, LLMOS_W_F32, 0, p, K, N, NULL, y, m, LIN_PMR);
            switch (m1 - m) {
            case 5: lin_ptile(x, x_stride, wide, LLMOS_W_F32, 0, p, K, N, NULL, y, m, 5); break;
            case 4: lin_ptile(x, x_stride, wide, LLMOS_W_F32, 0, p, K, N, NULL, y, m, 4); break;
            case 3: lin_ptile(x, x_stride, wide, LLMOS_W_F32, 0, p, K, N, NULL, y, m, 3); break;
            case 2: lin_ptile(x, x_stride, wide, LLMOS_W_F32, 0, p, K, N, NULL, y, m, 2); break;
            case 1: lin_ptile(x, x_stride, wide, LLMOS_W_F32, 0, p, K, N, NULL, y, m, 1); break;
            default: break;
            }
        }
    }
#endif
}

/* One function per kind (as LIN_PARALLEL's callers): the kind a constant inside. */
static void lin_q4_range(const float *x, int64_t x_stride, int64_t M, const void *w, int64_t K,
                         int64_t N, const float *scale, float *y, int64_t p0, int64_t p1) {
    (void)scale; /* the scales are in the blocks */
    lin_blk_range(x, x_stride, M, w, LLMOS_W_Q4, K, N, y, p0, p1);
}
static void lin_q8_range(const float *x, int64_t x_stride, int64_t M, const void *w, int64_t K,
                         int64_t N, const float *scale, float *y, int64_t p0, int64_t p1) {
    (void)scale;
    lin_blk_range(x, x_stride, M, w, LLMOS_W_Q8, K, N, y, p0, p1);
}
LIN_PARALLEL(lin_q4)
LIN_PARALLEL(lin_q8)
#endif

/* Rows of x from which bf16 weights multiply bf16-rounded rows (vdpbf16ps); 0 when this build
 * has no AVX512_BF16 (bf16 weights are then widened and multiply fp32 rows at every count). */
int llmos_linear_bf16_rows(void) {
#if defined(LLMOS_BF16_DOT)
    return LIN_BROWS;
#else
    return 0;
#endif
}

/* 1 when a single row of x multiplies 4-bit and 8-bit block weights in integers, quantised to
 * 16 bits per block (AVX512_VNNI and AVX512_VBMI, see LIN_BLK_VNNI); 0: in fp32 */
int llmos_linear_block_vnni(void) {
#if defined(LIN_BLK_VNNI)
    return 1;
#else
    return 0;
#endif
}

/* 1 when bf16 products of bf16-rounded rows run on AMX tiles (the build has AMX-BF16 and the
 * kernel asked Linux for the tile state and got it): for K a multiple of 32. */
int llmos_linear_bf16_amx(void) {
#if defined(LLMOS_AMX)
    return lin_amx_ready();
#else
    return 0;
#endif
}

int llmos_linear(const float *x, int64_t M, int64_t K, int64_t x_stride, const void *w,
                 int wtype, const float *scale, int64_t N, float *y) {
#if defined(LLMOS_AVX2) && defined(__F16C__)
    switch (wtype) {
    case LLMOS_W_F32: lin_f32(x, x_stride, M, w, K, N, scale, y); return 0;
    case LLMOS_W_F16: lin_f16(x, x_stride, M, w, K, N, scale, y); return 0;
    case LLMOS_W_I8: lin_i8(x, x_stride, M, w, K, N, scale, y); return 0;
    case LLMOS_W_BF16:
        if (K % 2) return 3; /* k pairs */
        lin_bf16(x, x_stride, M, w, K, N, scale, y);
        return 0;
    case LLMOS_W_Q4:
    case LLMOS_W_Q8:
        if (K % 32 || K > LIN_BLK_MAX_K) return 3;
        if (wtype == LLMOS_W_Q4)
            lin_q4(x, x_stride, M, w, K, N, scale, y);
        else
            lin_q8(x, x_stride, M, w, K, N, scale, y);
        return 0;
    default: return 2;
    }
#else
    (void)x; (void)M; (void)K; (void)x_stride; (void)w; (void)wtype; (void)scale; (void)N; (void)y;
    return 1;
#endif
}

/* ---------------------------------------------------------------- the whole decoder stack
 *
 * Every decoder layer of one step in one call, for steps whose every row the paged attention
 * above serves (decodes, and short chunks over a cached prefix): per layer, x += delta and
 * RMSNorm, the QKV projection, RoPE on q and k, k and v written to the cache at their slots,
 * attention, the output projection, x += o and RMSNorm, gate/up, SiLU(gate) * up, down.
 * The same arithmetic as the per-op entry points, in the same order, so results match them.
 *
 * Why one call: a decode step of a small model is ~10 short ops per layer; called one by one,
 * each pays a Python call, a tensor allocation and an OpenMP wake-up, which at batch 1 cost
 * about as much as reading the weights. Here the threads enter one parallel region per step,
 * split each op among themselves (rows, panels of a projection, or (sequence, KV head) items of
 * attention) and meet at a spinning barrier between dependent ops.
 *
 * dims: STACK_DIMS int64s, below. layers (num_layers, STACK_FIELDS) int64: per layer the
 * addresses of its norm weights (hidden,), its four packed projections (llmos_linear's layout,
 * all of weight type `wtype`) with their scales (int8; else 0), and its K and V caches
 * (num_blocks, block_size, Hkv, D), fp32, or fp16 when dims' SD_KV_HALF is set. x (T, hidden)
 * is the residual stream, updated in place. positions, slots (T,): RoPE row and KV slot of each
 * row; rows, block_tables, context_lens as for llmos_paged_decode_attention, and they must name
 * every row of x exactly once.
 * lora: NULL, or LoRA adapters added to every projection (see SL_* below): per row of x its
 * adapter slot (-1: the base model), per slot its rank, per layer the stacked A (slots, P*R, in)
 * and transposed B (slots, P*R, out) of each projection, fp32, where P is the projection's part
 * count (q, k, v; gate, up; else 1) and R the stack's max rank: part p of slot s owns rows
 * [p*R, p*R + rank_s) of A and, of Bt, the same rows over p's output columns only.
 * Returns 0; the attention statuses above; 6 for a bad position, slot or row cover; 7 for
 * inconsistent dims (or LoRA descriptor); 1 without AVX2/FMA/F16C (nothing is computed on a
 * non-zero status).
 */
enum {
    SD_HIDDEN, SD_HEADS, SD_KV_HEADS, SD_HEAD_DIM, SD_INTER, SD_LAYERS, SD_BLOCK_SIZE,
    SD_NUM_BLOCKS, SD_NUM_POSITIONS, SD_KV_HALF, STACK_DIMS
};
enum {
    SF_INPUT_NORM, SF_POST_NORM, SF_W_QKV, SF_S_QKV, SF_W_O, SF_S_O, SF_W_GATE_UP, SF_S_GATE_UP,
    SF_W_DOWN, SF_S_DOWN, SF_K_CACHE, SF_V_CACHE, STACK_FIELDS
};

/* the LoRA descriptor: int64 header, and per layer SL_FIELDS addresses (A, Bt per projection) */
enum { SL_SLOTS, SL_MAX_RANK, SL_RANKS, SL_ROW_SLOTS, SL_TABLE, SL_HEADER };
enum {
    SL_A_QKV, SL_B_QKV, SL_A_O, SL_B_O, SL_A_GATE_UP, SL_B_GATE_UP, SL_A_DOWN, SL_B_DOWN, SL_FIELDS
};
#define STACK_LORA_MAX_RANK 256

int llmos_stack_dims(void) { return STACK_DIMS; }
int llmos_stack_fields(void) { return STACK_FIELDS; }
int llmos_stack_lora_fields(void) { return SL_HEADER * 100 + SL_FIELDS; }

#if defined(LLMOS_AVX2) && defined(__F16C__)
/* A sense-reversing barrier that spins (then yields): the threads of one step meet ~8 times per
 * layer, far more often than a sleeping barrier could wake them cheaply. */
typedef struct {
    int count;
    int sense;
} stack_barrier;

static void stack_wait(stack_barrier *b, int nt, int *local_sense) {
    if (nt == 1) return;
    const int s = *local_sense = !*local_sense;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, s, __ATOMIC_RELEASE);
        return;
    }
    for (int spins = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != s;)
        if (++spins < (1 << 14))
            _mm_pause();
        else
            sched_yield(); /* why: another process may hold the core the other thread needs */
}

/* This thread's share [p0, p1) of a projection's panels, by weight type. */
static void stack_linear(int wtype, const float *x, int64_t M, const void *w, int64_t K,
                         int64_t N, const float *scale, float *y, int tid, int nt) {
    const int64_t panels = (N + LIN_PNR - 1) / LIN_PNR;
    const int64_t p0 = panels * tid / nt, p1 = panels * (tid + 1) / nt;
    if (p0 == p1) return;
    switch (wtype) {
    case LLMOS_W_F32: lin_f32_range(x, K, M, w, K, N, scale, y, p0, p1); break;
    case LLMOS_W_F16: lin_f16_range(x, K, M, w, K, N, scale, y, p0, p1); break;
    case LLMOS_W_BF16: lin_bf16_range(x, K, M, w, K, N, scale, y, p0, p1); break;
    case LLMOS_W_Q4: lin_q4_range(x, K, M, w, K, N, scale, y, p0, p1); break;
    case LLMOS_W_Q8: lin_q8_range(x, K, M, w, K, N, scale, y, p0, p1); break;
    default: lin_i8_range(x, K, M, w, K, N, scale, y, p0, p1); break;
    }
}

/* y[r] += B_s (A_s x[r]) on this thread's rows r (tid, tid + nt, ...: the partition of the
 * row-wise ops around it, so no barrier is needed before them), for rows with a slot s >= 0:
 * per part p, rank_s dot products of x[r] with A's rows, then as many scaled rows of Bt added
 * over p's columns [off[p], off[p] + len[p]). Zero-rank parts and base rows cost nothing. */
static void stack_lora(const float *x, int64_t in, float *y, int64_t out, int64_t T,
                       const int64_t *lora, const float *A, const float *Bt, int parts,
                       const int64_t *off, const int64_t *len, int tid, int nt) {
    const int64_t R = lora[SL_MAX_RANK];
    const int64_t *ranks = (const int64_t *)(intptr_t)lora[SL_RANKS];
    const int64_t *row_slot = (const int64_t *)(intptr_t)lora[SL_ROW_SLOTS];
    float low[STACK_LORA_MAX_RANK];
    for (int64_t r = tid; r < T; r += nt) {
        const int64_t s = row_slot[r];
        if (s < 0) continue;
        const int64_t rank = ranks[s];
        const float *xr = x + r * in;
        for (int p = 0; p < parts; ++p) {
            const int64_t first = (s * parts + p) * R; /* A's and Bt's first row of (s, p) */
            const float *a = A + first * in;
            for (int64_t i = 0; i < rank; ++i) {
                const float *ai = a + i * in;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t k = 0; k < in; ++k) acc += ai[k] * xr[k];
                low[i] = acc;
            }
            float *yp = y + r * out + off[p];
            const float *b = Bt + first * out + off[p];
            const int64_t n = len[p];
            for (int64_t i = 0; i < rank; ++i) {
                const float li = low[i], *bi = b + i * out;
#pragma omp simd
                for (int64_t j = 0; j < n; ++j) yp[j] += li * bi[j];
            }
        }
    }
}
#endif

/* 0 when a LoRA descriptor fits T rows and L layers (ranks, slots in range), else 7. */
static int check_stack_lora(const int64_t *lora, int64_t T, int64_t L) {
    const int64_t slots = lora[SL_SLOTS], R = lora[SL_MAX_RANK];
    if (slots < 1 || R < 1 || R > STACK_LORA_MAX_RANK || !lora[SL_RANKS] || !lora[SL_ROW_SLOTS] ||
        (L > 0 && !lora[SL_TABLE]))
        return 7;
    const int64_t *ranks = (const int64_t *)(intptr_t)lora[SL_RANKS];
    const int64_t *row_slot = (const int64_t *)(intptr_t)lora[SL_ROW_SLOTS];
    for (int64_t s = 0; s < slots; ++s)
        if (ranks[s] < 0 || ranks[s] > R) return 7;
    for (int64_t r = 0; r < T; ++r)
        if (row_slot[r] < -1 || row_slot[r] >= slots) return 7;
    const int64_t *table = (const int64_t *)(intptr_t)lora[SL_TABLE];
    for (int64_t i = 0; i < L * SL_FIELDS; ++i)
        if (!table[i]) return 7;
    return 0;
}

int llmos_decoder_stack(const int64_t *dims, const int64_t *layers, int wtype, float eps,
                        float attn_scale, const float *cos_t, const float *sin_t, float *x,
                        int64_t T, const int64_t *positions, const int64_t *slots,
                        const int64_t *rows, const int64_t *block_tables,
                        const int64_t *context_lens, int64_t num_seqs, int64_t max_blocks,
                        const int64_t *lora) {
#if defined(LLMOS_AVX2) && defined(__F16C__)
    const int64_t hidden = dims[SD_HIDDEN], H = dims[SD_HEADS], Hkv = dims[SD_KV_HEADS];
    const int64_t D = dims[SD_HEAD_DIM], inter = dims[SD_INTER], L = dims[SD_LAYERS];
    const int64_t bs = dims[SD_BLOCK_SIZE], num_blocks = dims[SD_NUM_BLOCKS];
    const int kv_half = dims[SD_KV_HALF] != 0; /* fp16 K/V caches */
    if (hidden < 1 || D < 2 || D % 2 || inter < 1 || L < 0 || bs < 1 || T < 1) return 7;
    if (wtype != LLMOS_W_F32 && wtype != LLMOS_W_F16 && wtype != LLMOS_W_I8 &&
        wtype != LLMOS_W_BF16 && wtype != LLMOS_W_Q4 && wtype != LLMOS_W_Q8)
        return 7;
    if ((wtype == LLMOS_W_Q4 || wtype == LLMOS_W_Q8) &&
        (hidden % 32 || inter % 32 || (dims[SD_HEADS] * D) % 32 || hidden > LIN_BLK_MAX_K ||
         inter > LIN_BLK_MAX_K || dims[SD_HEADS] * D > LIN_BLK_MAX_K))
        return 7;
    if (wtype == LLMOS_W_BF16 && (hidden % 2 || inter % 2)) return 7; /* k pairs; D is even */
    int64_t max_len, total_len;
    const int status = check_attention(block_tables, context_lens, rows, num_seqs, H, Hkv, bs,
                                       max_blocks, num_blocks, T, &max_len, &total_len);
    if (status != 0) return status;
    for (int64_t r = 0; r < T; ++r)
        if (positions[r] < 0 || positions[r] >= dims[SD_NUM_POSITIONS] || slots[r] < 0 ||
            slots[r] >= num_blocks * bs)
            return 6;
    if (lora != NULL && check_stack_lora(lora, T, L) != 0) return 7;
    if (num_seqs != T) return 6; /* one attention row per row of x ... */
    unsigned char *seen = calloc((size_t)T, 1);
    if (seen == NULL) return 3;
    int cover = 1;
    for (int64_t s = 0; s < num_seqs; ++s) { /* ... each row once */
        cover &= !seen[rows[s]];
        seen[rows[s]] = 1;
    }
    free(seen);
    if (!cover) return 6;

    const int64_t group = H / Hkv, qkv_n = (H + 2 * Hkv) * D, att_n = H * D, kv_row = Hkv * D;
    /* each projection's LoRA parts: output column offset and width */
    const int64_t qkv_off[3] = {0, H * D, (H + Hkv) * D}, qkv_len[3] = {H * D, kv_row, kv_row};
    const int64_t gu_off[2] = {0, inter}, gu_len[2] = {inter, inter};
    const int64_t one_off[1] = {0}, hidden_len[1] = {hidden};
    const int64_t *lora_table = lora != NULL ? (const int64_t *)(intptr_t)lora[SL_TABLE] : NULL;
    const int max_threads = omp_get_max_threads();
    /* scratch: h (T, hidden), qkv (T, qkv_n), att (T, att_n), gate_up (T, 2I), act (T, I),
     * delta (T, hidden), then (group, max_len) scores per thread */
    const size_t step_floats = (size_t)T * (size_t)(2 * hidden + qkv_n + att_n + 3 * inter);
    float *scratch = malloc(sizeof(float) *
                            (step_floats + (size_t)max_threads * (size_t)(group * max_len)));
    if (scratch == NULL) return 3;
    float *h = scratch, *qkv = h + T * hidden, *att = qkv + T * qkv_n;
    float *gate_up = att + T * att_n, *act = gate_up + T * 2 * inter, *delta = act + T * inter;
    float *scores_all = scratch + step_floats;
    stack_barrier barrier = {0, 0};

#pragma omp parallel
    {
        const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
        float *scores = scores_all + (size_t)tid * (size_t)(group * max_len);
        int sense = 0;
        /* silu_mul's columns for this thread: an 8-aligned share of each row */
        const int64_t c0 = (inter * tid / nt) & ~(int64_t)7;
        const int64_t c1 = tid == nt - 1 ? inter : (inter * (tid + 1) / nt) & ~(int64_t)7;
        /* attention items (sequence, KV head) for this thread: [a0, a1), a contiguous range of
         * about 1 / nt of the work (context length plus a fixed cost per item). why not every
         * nt-th item: contexts differ by up to 16x, and the thread that drew the longer ones
         * kept the other waiting at the barrier after attention in every layer */
        int64_t a0 = 0, a1 = 0;
        {
            const int64_t fixed = 16;
            int64_t total = 0;
            for (int64_t s = 0; s < num_seqs; ++s) total += (context_lens[s] + fixed) * Hkv;
            const int64_t lo = total * tid / nt, hi = total * (tid + 1) / nt;
            int64_t done = 0; /* work of the items before item i */
            a0 = a1 = num_seqs * Hkv;
            for (int64_t i = 0; i < num_seqs * Hkv; ++i) {
                if (done >= lo && a0 == num_seqs * Hkv) a0 = i;
                if (done >= hi) {
                    a1 = i;
                    break;
                }
                done += context_lens[i / Hkv] + fixed;
            }
            if (a0 > a1) a0 = a1;
        }
        for (int64_t l = 0; l < L; ++l) {
            const int64_t *f = layers + l * STACK_FIELDS;
            const int64_t *lw = lora_table != NULL ? lora_table + l * SL_FIELDS : NULL;
#define LW(i) ((const float *)(intptr_t)lw[i])
            void *k_cache = (void *)(intptr_t)f[SF_K_CACHE];
            void *v_cache = (void *)(intptr_t)f[SF_V_CACHE];
            for (int64_t r = tid; r < T; r += nt) /* x += delta (the previous MLP); h = norm */
                norm_row(x + r * hidden, l > 0 ? delta + r * hidden : NULL,
                         (const float *)(intptr_t)f[SF_INPUT_NORM], h + r * hidden, hidden, eps);
            stack_wait(&barrier, nt, &sense);
            stack_linear(wtype, h, T, (const void *)(intptr_t)f[SF_W_QKV], hidden, qkv_n,
                         (const float *)(intptr_t)f[SF_S_QKV], qkv, tid, nt);
            stack_wait(&barrier, nt, &sense);
            if (lw != NULL) /* before RoPE, as PEFT adds to q_proj's output */
                stack_lora(h, hidden, qkv, qkv_n, T, lora, LW(SL_A_QKV), LW(SL_B_QKV), 3,
                           qkv_off, qkv_len, tid, nt);
            for (int64_t r = tid; r < T; r += nt) { /* RoPE on q and k; k and v to the cache */
                float *qr = qkv + r * qkv_n;
                rope_row(qr, H + Hkv, D, cos_t + positions[r] * D, sin_t + positions[r] * D);
                if (kv_half) {
                    narrow_half((uint16_t *)k_cache + slots[r] * kv_row, qr + H * D, kv_row);
                    narrow_half((uint16_t *)v_cache + slots[r] * kv_row, qr + (H + Hkv) * D,
                                kv_row);
                } else {
                    memcpy((float *)k_cache + slots[r] * kv_row, qr + H * D,
                           sizeof(float) * kv_row);
                    memcpy((float *)v_cache + slots[r] * kv_row, qr + (H + Hkv) * D,
                           sizeof(float) * kv_row);
                }
            }
            stack_wait(&barrier, nt, &sense);
            for (int64_t item = a0; item < a1; ++item) {
                const int64_t s = item / Hkv, kvh = item % Hkv;
                attend_item(qkv + rows[s] * qkv_n + kvh * group * D,
                            att + (rows[s] * H + kvh * group) * D, k_cache, v_cache, kv_half,
                            block_tables + s * max_blocks, context_lens[s], kvh, group, Hkv, D,
                            bs, scores, max_len, attn_scale);
            }
            stack_wait(&barrier, nt, &sense);
            stack_linear(wtype, att, T, (const void *)(intptr_t)f[SF_W_O], att_n, hidden,
                         (const float *)(intptr_t)f[SF_S_O], delta, tid, nt);
            stack_wait(&barrier, nt, &sense);
            if (lw != NULL)
                stack_lora(att, att_n, delta, hidden, T, lora, LW(SL_A_O), LW(SL_B_O), 1,
                           one_off, hidden_len, tid, nt);
            for (int64_t r = tid; r < T; r += nt) /* x += o; h = norm */
                norm_row(x + r * hidden, delta + r * hidden,
                         (const float *)(intptr_t)f[SF_POST_NORM], h + r * hidden, hidden, eps);
            stack_wait(&barrier, nt, &sense);
            stack_linear(wtype, h, T, (const void *)(intptr_t)f[SF_W_GATE_UP], hidden,
                         2 * inter, (const float *)(intptr_t)f[SF_S_GATE_UP], gate_up, tid, nt);
            stack_wait(&barrier, nt, &sense);
            if (lw != NULL) { /* silu_mul below splits columns, not rows: wait for every row */
                stack_lora(h, hidden, gate_up, 2 * inter, T, lora, LW(SL_A_GATE_UP),
                           LW(SL_B_GATE_UP), 2, gu_off, gu_len, tid, nt);
                stack_wait(&barrier, nt, &sense);
            }
            for (int64_t r = 0; r < T; ++r)
                silu_mul_span(gate_up + r * 2 * inter + c0, gate_up + r * 2 * inter + inter + c0,
                              act + r * inter + c0, c1 - c0);
            stack_wait(&barrier, nt, &sense);
            stack_linear(wtype, act, T, (const void *)(intptr_t)f[SF_W_DOWN], inter, hidden,
                         (const float *)(intptr_t)f[SF_S_DOWN], delta, tid, nt);
            stack_wait(&barrier, nt, &sense);
            if (lw != NULL)
                stack_lora(act, inter, delta, hidden, T, lora, LW(SL_A_DOWN), LW(SL_B_DOWN), 1,
                           one_off, hidden_len, tid, nt);
#undef LW
        }
        if (L > 0)
            for (int64_t r = tid; r < T; r += nt) /* x += the last layer's MLP output */
                for (int64_t j = 0; j < hidden; ++j) x[r * hidden + j] += delta[r * hidden + j];
    }
    free(scratch);
    return 0;
#else
    (void)dims; (void)layers; (void)wtype; (void)eps; (void)attn_scale; (void)cos_t; (void)sin_t;
    (void)x; (void)T; (void)positions; (void)slots; (void)rows; (void)block_tables;
    (void)context_lens; (void)num_seqs; (void)max_blocks; (void)lora;
    return 1;
#endif
}
