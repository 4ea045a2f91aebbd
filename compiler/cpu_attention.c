/* Paged decode attention for CPU (float32): one query token per sequence, read straight from the cache
 * blocks, so no per-step gather of the whole context. Each sequence is one task that reads every cached
 * token's K (all KV heads, contiguous) once for the scores and its V once for the weighted sum. Built on
 * first use by compiler/cpu_attention.py; the torch reference in compiler/ops.py is the specification. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

void paged_decode_f32(
    const float *restrict q,              /* [S, Hq, D] */
    const float *restrict k_cache,        /* [num_blocks, block_size, Hkv, D] */
    const float *restrict v_cache,        /* [num_blocks, block_size, Hkv, Dv] */
    const int32_t *restrict block_tables, /* [S, table_width] */
    const int32_t *restrict seq_lens,     /* [S] */
    float *restrict out,                  /* [S, Hq, Dv] */
    int64_t num_seqs, int64_t num_heads, int64_t kv_heads, int64_t head_dim, int64_t v_dim,
    int64_t block_size, int64_t table_width, float scale, int64_t window, float softcap)
{
    const int64_t group = num_heads / kv_heads;
#pragma omp parallel for schedule(dynamic)
    for (int64_t s = 0; s < num_seqs; ++s) {
        const int64_t len = seq_lens[s];
        const int64_t start = (window > 0 && len > window) ? len - window : 0;
        const int64_t n = len - start > 0 ? len - start : 1;
        float *scores = malloc(sizeof(float) * num_heads * n); /* [Hq, n] */
        const float *qs = q + s * num_heads * head_dim;
        for (int64_t j = start; j < len; ++j) {
            const int64_t slot = block_tables[s * table_width + j / block_size] * block_size + j % block_size;
            const float *kj = k_cache + slot * kv_heads * head_dim;
            for (int64_t hq = 0; hq < num_heads; ++hq) {
                const float *qh = qs + hq * head_dim, *kh = kj + (hq / group) * head_dim;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * kh[d];
                dot *= scale;
                if (softcap > 0.f) dot = tanhf(dot / softcap) * softcap;
                scores[hq * n + (j - start)] = dot;
            }
        }
        for (int64_t hq = 0; hq < num_heads; ++hq) {
            float *sh = scores + hq * n, m = -INFINITY, total = 0.f;
            for (int64_t i = 0; i < len - start; ++i) m = sh[i] > m ? sh[i] : m;
            for (int64_t i = 0; i < len - start; ++i) { sh[i] = expf(sh[i] - m); total += sh[i]; }
            const float inv = total > 0.f ? 1.f / total : 0.f;
            for (int64_t i = 0; i < len - start; ++i) sh[i] *= inv;
        }
        float *o = out + s * num_heads * v_dim;
        for (int64_t i = 0; i < num_heads * v_dim; ++i) o[i] = 0.f;
        for (int64_t j = start; j < len; ++j) {
            const int64_t slot = block_tables[s * table_width + j / block_size] * block_size + j % block_size;
            const float *vj = v_cache + slot * kv_heads * v_dim;
            for (int64_t hq = 0; hq < num_heads; ++hq) {
                const float p = scores[hq * n + (j - start)], *vh = vj + (hq / group) * v_dim;
                float *oh = o + hq * v_dim;
#pragma omp simd
                for (int64_t d = 0; d < v_dim; ++d) oh[d] += p * vh[d];
            }
        }
        free(scores);
    }
}
