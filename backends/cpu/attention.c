/* Paged decode attention on the CPU (kiln::paged_attention's decode rows; ops/attention.py is the specification),
 * compiled into the same extension module as kernels.c, which holds its Python binding.
 *
 * One query token per sequence, read straight from the cache blocks (no per-step gather of the context). A task
 * is one sequence, or a part of its KV heads when there are fewer sequences than threads (batch-1 decode uses
 * every core). It walks the context in chunks of CHUNK tokens, every query head of the task scoring a chunk
 * while its cache rows are in L1, so each row is read from memory once; then a softmax per head, and the
 * weighted sum of V in the same chunks. With AVX2 (both x86 vector builds) the scores come eight tokens at a
 * time, eight dot products reduced together by one horizontal-add tree, and the weighted sum keeps its output
 * slice in registers across a chunk; the portable loops do the same work one token at a time. Each token's
 * cache row is looked up once per task: the loops divide no integers (a 64-bit division per token and head was
 * most of the time of the loop this replaced). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vexp.h"

#if defined(__AVX2__) && defined(__FMA__) /* the AVX2 and AVX-512 builds; vexp.h included immintrin.h */
#define ATTN_AVX2 1
#endif

/* Tokens per pass of a task's heads over the cache: 16 rows (16 KiB with 4 KV heads of 64) stay in L1 while
 * every head reads them; longer chunks measured slower (L1 set conflicts between rows 1 KiB apart). */
#define CHUNK 16

/* Cache row (slot) of each token in [start, start + n) of a sequence, from its block table. */
static void token_slots(const int32_t *table, int64_t start, int64_t n, int64_t block_size, int64_t *slots)
{
    for (int64_t t = 0, blk = start / block_size, off = start % block_size; t < n; ++t) {
        slots[t] = (int64_t)table[blk] * block_size + off;
        if (++off == block_size) off = 0, ++blk;
    }
}

#ifdef ATTN_AVX2
/* The eight sums of a[0..7]'s lanes, in order: hadd pairs neighbours, twice, leaving each token's two 128-bit
 * halves' sums in the two halves of a vector; the final add joins the halves. */
static inline __m256 hsum8x8(const __m256 a[8])
{
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}
#endif

/* scores[t] = (q . k_t) * scale for the n tokens, k_t = k + slots[t] * stride. */
static void score_tokens(const float *restrict q, const float *restrict k, int64_t stride, const int64_t *slots,
                         int64_t n, int64_t dim, float scale, float *restrict scores)
{
    int64_t t = 0;
#ifdef ATTN_AVX2
    if (dim % 8 == 0)
        for (; t + 8 <= n; t += 8) {
            __m256 a[8];
            for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
            for (int64_t d = 0; d < dim; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q + d);
                for (int u = 0; u < 8; ++u)
                    a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + slots[t + u] * stride + d), a[u]);
            }
            _mm256_storeu_ps(scores + t, _mm256_mul_ps(hsum8x8(a), _mm256_set1_ps(scale)));
        }
#endif
    for (; t < n; ++t) {
        const float *kt = k + slots[t] * stride;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += q[d] * kt[d];
        scores[t] = dot * scale;
    }
}

/* p = softmax(p) over n scores (max subtracted first); all-zero weights when n == 0. */
static void softmax(float *restrict p, int64_t n)
{
    float m = -INFINITY, total = 0.f;
    for (int64_t i = 0; i < n; ++i) m = p[i] > m ? p[i] : m;
    int64_t i = 0;
#ifdef ATTN_AVX2
    __m256 sum8 = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 e = vexpf8(_mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_set1_ps(m)));
        _mm256_storeu_ps(p + i, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, sum8);
    for (int l = 0; l < 8; ++l) total += lanes[l];
#endif
#pragma omp simd reduction(+ : total)
    for (int64_t t = i; t < n; ++t) { p[t] = vexpf(p[t] - m); total += p[t]; }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    for (int64_t t = 0; t < n; ++t) p[t] *= inv;
}

#ifdef ATTN_AVX2
/* out[0 .. 8 * nv) += sum_t p[t] * v_t[0 .. 8 * nv): nv accumulators stay in registers over the tokens (nv is a
 * constant at each call, so the loops over it unroll). */
static inline __attribute__((always_inline)) void weigh_slice(const float *restrict p, const float *restrict v,
                                                              int64_t stride, const int64_t *slots, int64_t n,
                                                              int nv, float *restrict out)
{
    __m256 acc[8];
    for (int i = 0; i < nv; ++i) acc[i] = _mm256_loadu_ps(out + 8 * i);
    for (int64_t t = 0; t < n; ++t) {
        const __m256 pt = _mm256_broadcast_ss(p + t);
        const float *vt = v + slots[t] * stride;
        for (int i = 0; i < nv; ++i) acc[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vt + 8 * i), acc[i]);
    }
    for (int i = 0; i < nv; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}
#endif

/* out[0 .. dim) += sum_t p[t] * v_t, v_t = v + slots[t] * stride. */
static void weigh_tokens(const float *restrict p, const float *restrict v, int64_t stride, const int64_t *slots,
                         int64_t n, int64_t dim, float *restrict out)
{
    int64_t d0 = 0;
#ifdef ATTN_AVX2
    for (; d0 + 64 <= dim; d0 += 64) weigh_slice(p, v + d0, stride, slots, n, 8, out + d0);
    for (; d0 + 8 <= dim; d0 += 8) weigh_slice(p, v + d0, stride, slots, n, 1, out + d0);
#endif
    for (int64_t t = 0; t < n; ++t) {
        const float pt = p[t], *vt = v + slots[t] * stride;
#pragma omp simd
        for (int64_t d = d0; d < dim; ++d) out[d] += pt * vt[d];
    }
}

void paged_decode_f32(
    const float *restrict q,              /* [S, Hq, D] */
    const float *restrict k_cache,        /* [num_blocks, block_size, Hkv, D] */
    const float *restrict v_cache,        /* [num_blocks, block_size, Hkv, Dv] */
    const int32_t *restrict block_tables, /* [S, table_width] */
    const int32_t *restrict seq_lens,     /* [S] */
    float *restrict out,                  /* [S, Hq, Dv] */
    int64_t num_seqs, int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t v_dim,
    int64_t block_size, int64_t table_width, float scale, int64_t window, float softcap, int64_t threads)
{
    const int64_t group = num_heads / kv_heads;
    /* A task is (sequence, part of its KV heads): whole sequences when there are enough to share out, else each
     * split into up to one part per thread. */
    if (num_seqs <= 0) return;
    int64_t parts = num_seqs >= threads ? 1 : (threads + num_seqs - 1) / num_seqs;
    parts = parts < kv_heads ? parts : kv_heads;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(threads)
    for (int64_t s = 0; s < num_seqs; ++s)
        for (int64_t part = 0; part < parts; ++part) {
            const int64_t h0 = part * kv_heads / parts, h1 = (part + 1) * kv_heads / parts;
            const int64_t len = seq_lens[s];
            const int64_t start = (window > 0 && len > window) ? len - window : 0;
            const int64_t n = len > start ? len - start : 0, m = n > 0 ? n : 1;
            int64_t *slots = malloc(sizeof(int64_t) * m);
            float *p = malloc(sizeof(float) * (h1 - h0) * group * m); /* [its query heads, n] */
            token_slots(block_tables + s * table_width, start, n, block_size, slots);
            const float *qs = q + (s * num_heads + h0 * group) * head_dim;
            float *os = out + (s * num_heads + h0 * group) * v_dim;
            for (int64_t t = 0; t < n; t += CHUNK)
                for (int64_t h = h0, i = 0; h < h1; ++h)
                    for (int64_t g = 0; g < group; ++g, ++i)
                        score_tokens(qs + i * head_dim, k_cache + h * head_dim, kv_heads * head_dim, slots + t,
                                     n - t < CHUNK ? n - t : CHUNK, head_dim, scale, p + i * m + t);
            for (int64_t i = 0; i < (h1 - h0) * group; ++i) {
                if (softcap > 0.f)
                    for (int64_t t = 0; t < n; ++t) p[i * m + t] = tanhf(p[i * m + t] / softcap) * softcap;
                softmax(p + i * m, n);
            }
            for (int64_t i = 0; i < (h1 - h0) * group * v_dim; ++i) os[i] = 0.f;
            for (int64_t t = 0; t < n; t += CHUNK)
                for (int64_t h = h0, i = 0; h < h1; ++h)
                    for (int64_t g = 0; g < group; ++g, ++i)
                        weigh_tokens(p + i * m + t, v_cache + h * v_dim, kv_heads * v_dim, slots + t,
                                     n - t < CHUNK ? n - t : CHUNK, v_dim, os + i * v_dim);
            free(slots);
            free(p);
        }
}
