/* int8 linears behind kiln::linear_w8a8_packed and kiln::linear_int8_packed on the reference backend, compiled
 * into the same extension module as kernels.c (which holds their Python bindings). Both read weights that
 * backend "reference" stored in tiles when it lowered the graph (ops/quant.py packs them), so each tile
 * streams front to back; ops/quant.py's references are the specification. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* Both linears stream their weights once per call, at decode sizes faster than the hardware prefetcher fetches
 * them for one core: asking for the line 2 KiB ahead made w8a8 ~1.15x and int8 ~1.4x faster on both vector
 * paths (bench/cpu_isa.py). A prefetch past the end of the weights is harmless. */
#define PREFETCH_AHEAD(p) __builtin_prefetch((const char *)(p) + 2048)
#define PARALLEL_MIN 65536 /* as in kernels.c: below this many elements one thread does the work */

/* W8A8 (kiln::linear_w8a8_packed): each row of x (times input_scale) is quantized to int8 with its own scale,
 * exactly as ops/quant.py quantize_tokens does; the int32 dot products with the int8 weights are exact and the
 * float epilogue is the reference's, (acc * x_scale) * w_scale + bias, so results equal it bit for bit on every
 * path (the integer sums are the same numbers whatever instructions add them).
 * Weights come in tiles of 4 rows x 64 columns, [n/4][k/64][4][64] (ops/quant.py pack_w8a8): a 4-row block is
 * then read front to back, which streams at about twice the speed of four interleaved rows of HF's layout on
 * this kind of CPU. Each block stays in L1 while every row of x passes over it.
 * AVX-512 VNNI multiplies u8 x s8 only, so there x is stored offset by 128 as uint8 and the offset is taken back
 * out with each weight row's sum (a dot with a vector of ones, in the same pass). AVX2 has no 4-way dot into
 * int32: vpmaddubsw (u8 x s8 -> pairs summed to a saturating s16) gets |w| (read as unsigned, so even -128 is
 * exact) and x * sign(w), with |x| <= 127, so a pair sums to at most 2 * 128 * 127 = 32512 and cannot saturate;
 * vpmaddwd against ones then widens the pairs to int32. There, and in the portable loop, x is plain int8. */
#define W8A8_ROWS 4
#define W8A8_COLS 64
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define W8A8_OFFSET 128
#define W8A8_MR 4 /* rows of x per pass over a block: 4 x 4 accumulators (of 32 registers) */
/* acc[m][r] += x_m . w_r over k for mr rows of x and one block of 4 weight rows; wsum[r] = sum of w_r. */
static inline __attribute__((always_inline)) void w8a8_tile(const uint8_t *restrict x, const int8_t *restrict wb,
                                                            int64_t k, int mr, int32_t *acc, int32_t *wsum)
{
    __m512i a[4][W8A8_ROWS], s[W8A8_ROWS];
    const __m512i ones = _mm512_set1_epi8(1);
    for (int r = 0; r < W8A8_ROWS; ++r) {
        s[r] = _mm512_setzero_si512();
        for (int m = 0; m < mr; ++m) a[m][r] = _mm512_setzero_si512();
    }
    for (int64_t c = 0; c < k / W8A8_COLS; ++c) {
        __m512i wv[W8A8_ROWS];
        for (int r = 0; r < W8A8_ROWS; ++r) PREFETCH_AHEAD(wb + (c * W8A8_ROWS + r) * W8A8_COLS);
        for (int r = 0; r < W8A8_ROWS; ++r) wv[r] = _mm512_loadu_si512(wb + (c * W8A8_ROWS + r) * W8A8_COLS);
        if (wsum)
            for (int r = 0; r < W8A8_ROWS; ++r) s[r] = _mm512_dpbusd_epi32(s[r], ones, wv[r]);
        for (int m = 0; m < mr; ++m) {
            const __m512i xv = _mm512_loadu_si512(x + m * k + c * W8A8_COLS);
            for (int r = 0; r < W8A8_ROWS; ++r) a[m][r] = _mm512_dpbusd_epi32(a[m][r], xv, wv[r]);
        }
    }
    for (int r = 0; r < W8A8_ROWS; ++r) {
        if (wsum) wsum[r] = _mm512_reduce_add_epi32(s[r]);
        for (int m = 0; m < mr; ++m) acc[m * W8A8_ROWS + r] = _mm512_reduce_add_epi32(a[m][r]);
    }
}
#elif defined(__AVX2__)
#define W8A8_OFFSET 0
#define W8A8_MR 2 /* 2 x 4 accumulators leave room in AVX2's 16 registers for the operands */
static inline int32_t hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

/* acc[m][r] = x_m . w_r over k (x as int8) for mr rows of x and one block of 4 weight rows; wsum is unused. */
static inline __attribute__((always_inline)) void w8a8_tile(const uint8_t *restrict x, const int8_t *restrict wb,
                                                            int64_t k, int mr, int32_t *acc, int32_t *wsum)
{
    (void)wsum;
    __m256i a[4][W8A8_ROWS]; /* mr <= W8A8_MR = 2 here: the rest is never touched */
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < W8A8_ROWS; ++r)
        for (int m = 0; m < mr; ++m) a[m][r] = _mm256_setzero_si256();
    for (int64_t c = 0; c < k / W8A8_COLS; ++c)
        for (int h = 0; h < W8A8_COLS; h += 32) {
            if (h == 0)
                for (int r = 0; r < W8A8_ROWS; ++r) PREFETCH_AHEAD(wb + (c * W8A8_ROWS + r) * W8A8_COLS);
            __m256i xv[4];
            for (int m = 0; m < mr; ++m) xv[m] = _mm256_loadu_si256((const void *)(x + m * k + c * W8A8_COLS + h));
            for (int r = 0; r < W8A8_ROWS; ++r) {
                const __m256i w = _mm256_loadu_si256((const void *)(wb + (c * W8A8_ROWS + r) * W8A8_COLS + h));
                const __m256i aw = _mm256_abs_epi8(w);
                for (int m = 0; m < mr; ++m) {
                    const __m256i pairs = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[m], w));
                    a[m][r] = _mm256_add_epi32(a[m][r], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
    for (int r = 0; r < W8A8_ROWS; ++r)
        for (int m = 0; m < mr; ++m) acc[m * W8A8_ROWS + r] = hsum_epi32(a[m][r]);
}
#else
#define W8A8_OFFSET 0
#define W8A8_MR 4
static inline void w8a8_tile(const uint8_t *restrict x, const int8_t *restrict wb, int64_t k, int mr,
                             int32_t *acc, int32_t *wsum)
{
    (void)wsum;
    for (int r = 0; r < W8A8_ROWS; ++r)
        for (int m = 0; m < mr; ++m) {
            int32_t dot = 0;
            for (int64_t c = 0; c < k / W8A8_COLS; ++c) {
                const int8_t *w = wb + (c * W8A8_ROWS + r) * W8A8_COLS;
                const int8_t *xm = (const int8_t *)x + m * k + c * W8A8_COLS;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < W8A8_COLS; ++i) dot += (int32_t)xm[i] * (int32_t)w[i];
            }
            acc[m * W8A8_ROWS + r] = dot;
        }
}
#endif

static void quantize_row_u8(const float *restrict x, const float *restrict in_scale, uint8_t *restrict q,
                            float *restrict q_scale, int64_t k)
{
    float amax = 0.f;
    for (int64_t i = 0; i < k; ++i) {
        const float v = fabsf(in_scale ? x[i] * in_scale[i] : x[i]);
        amax = v > amax ? v : amax;
    }
    const float s = (amax > 1e-8f ? amax : 1e-8f) / 127.f;
    for (int64_t i = 0; i < k; ++i) {
        float r = nearbyintf((in_scale ? x[i] * in_scale[i] : x[i]) / s); /* half to even, as torch.round */
        r = r < -127.f ? -127.f : (r > 127.f ? 127.f : r);
        q[i] = (uint8_t)((int32_t)r + W8A8_OFFSET); /* without the offset: int8's bytes */
    }
    *q_scale = s;
}

__attribute__((optimize("fp-contract=off"))) /* the reference's epilogue, rounding for rounding */
void linear_w8a8_packed(const float *restrict x, const float *restrict in_scale, const int8_t *restrict w,
                               const float *restrict scale, const float *restrict bias, float *restrict out,
                               int64_t rows, int64_t n, int64_t k, int64_t x_stride, int64_t threads)
{
    uint8_t *xq = malloc((size_t)rows * k);
    float *xs = malloc(sizeof(float) * rows);
#pragma omp parallel for num_threads(threads) if (rows * k >= PARALLEL_MIN)
    for (int64_t m = 0; m < rows; ++m) quantize_row_u8(x + m * x_stride, in_scale, xq + m * k, xs + m, k);
#pragma omp parallel for num_threads(threads) if (rows * n * k >= 262144) schedule(static)
    for (int64_t b = 0; b < n / W8A8_ROWS; ++b) {
        const int8_t *wb = w + b * W8A8_ROWS * k;
        int32_t wsum[W8A8_ROWS] = {0}, acc[4 * W8A8_ROWS];
        for (int64_t m0 = 0; m0 < rows; m0 += W8A8_MR) { /* a constant mr lets the accumulators stay in registers */
            const uint8_t *xm = xq + m0 * k;
            int32_t *ws = m0 == 0 && W8A8_OFFSET ? wsum : NULL;
            const int64_t mr = rows - m0 < W8A8_MR ? rows - m0 : W8A8_MR;
            switch (mr) {
            case 4: w8a8_tile(xm, wb, k, 4, acc, ws); break;
            case 3: w8a8_tile(xm, wb, k, 3, acc, ws); break;
            case 2: w8a8_tile(xm, wb, k, 2, acc, ws); break;
            default: w8a8_tile(xm, wb, k, 1, acc, ws); break;
            }
            for (int64_t m = 0; m < mr; ++m)
                for (int64_t r = 0; r < W8A8_ROWS; ++r) {
                    const int64_t j = b * W8A8_ROWS + r;
                    const float y = (float)(acc[m * W8A8_ROWS + r] - W8A8_OFFSET * wsum[r]) * xs[m0 + m] * scale[j];
                    out[(m0 + m) * n + j] = bias ? y + bias[j] : y;
                }
        }
    }
    free(xq);
    free(xs);
}

/* Weight-only int8 (kiln::linear_int8_packed) at decode sizes: weights in tiles of 16 output channels,
 * [n/16][k][16] (ops/quant.py pack_int8), so one tile is read front to back and each k step converts 16 weights
 * to float once for up to 4 rows of x, vectorised across the 16 channels (no horizontal sums). Activations stay
 * exact: y = (x . w) * scale + bias with float32 accumulation. */
#define I8_TILE 16
#if defined(__AVX512F__)
/* Four k steps per iteration into four accumulators per row: the FMA chains overlap (32 registers hold them). */
static inline __attribute__((always_inline)) void i8_tile(const float *restrict x, int64_t x_stride,
                                                          const int8_t *restrict wt, int64_t k, int mr,
                                                          float acc[4][I8_TILE])
{
    __m512 a[4][4];
    for (int m = 0; m < mr; ++m)
        for (int u = 0; u < 4; ++u) a[m][u] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= k; i += 4)
        for (int u = 0; u < 4; ++u) {
            if (u == 0) PREFETCH_AHEAD(wt + i * I8_TILE); /* 4 k steps of 16 channels: one 64-byte line */
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(wt + (i + u) * I8_TILE))));
            for (int m = 0; m < mr; ++m) a[m][u] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * x_stride + i + u]), w, a[m][u]);
        }
    for (; i < k; ++i) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)(wt + i * I8_TILE))));
        for (int m = 0; m < mr; ++m) a[m][0] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * x_stride + i]), w, a[m][0]);
    }
    for (int m = 0; m < mr; ++m)
        _mm512_storeu_ps(acc[m], _mm512_add_ps(_mm512_add_ps(a[m][0], a[m][1]), _mm512_add_ps(a[m][2], a[m][3])));
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The 16 channels are two 8-float halves; with 16 registers, u = 4 / mr k steps per iteration (rounded down, at
 * least one) go into their own accumulators, so one row still overlaps four FMA chains. */
static inline __attribute__((always_inline)) void i8_tile(const float *restrict x, int64_t x_stride,
                                                          const int8_t *restrict wt, int64_t k, int mr,
                                                          float acc[4][I8_TILE])
{
    const int unroll = mr == 1 ? 4 : (mr == 2 ? 2 : 1);
    __m256 a[4][4][2];
    for (int m = 0; m < mr; ++m)
        for (int u = 0; u < unroll; ++u) a[m][u][0] = a[m][u][1] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + unroll <= k; i += unroll)
        for (int u = 0; u < unroll; ++u) {
            const int8_t *wi = wt + (i + u) * I8_TILE;
            if ((i + u) % 4 == 0) PREFETCH_AHEAD(wi);
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)wi)));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)(wi + 8))));
            for (int m = 0; m < mr; ++m) {
                const __m256 xi = _mm256_broadcast_ss(x + m * x_stride + i + u);
                a[m][u][0] = _mm256_fmadd_ps(xi, w0, a[m][u][0]);
                a[m][u][1] = _mm256_fmadd_ps(xi, w1, a[m][u][1]);
            }
        }
    for (; i < k; ++i) {
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)(wt + i * I8_TILE))));
        const __m256 w1 =
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)(wt + i * I8_TILE + 8))));
        for (int m = 0; m < mr; ++m) {
            const __m256 xi = _mm256_broadcast_ss(x + m * x_stride + i);
            a[m][0][0] = _mm256_fmadd_ps(xi, w0, a[m][0][0]);
            a[m][0][1] = _mm256_fmadd_ps(xi, w1, a[m][0][1]);
        }
    }
    for (int m = 0; m < mr; ++m)
        for (int h = 0; h < 2; ++h) {
            __m256 total = a[m][0][h];
            for (int u = 1; u < unroll; ++u) total = _mm256_add_ps(total, a[m][u][h]);
            _mm256_storeu_ps(acc[m] + 8 * h, total);
        }
}
#else
static inline void i8_tile(const float *restrict x, int64_t x_stride, const int8_t *restrict wt, int64_t k, int mr,
                           float acc[4][I8_TILE])
{
    for (int m = 0; m < mr; ++m)
        for (int c = 0; c < I8_TILE; ++c) acc[m][c] = 0.f;
    for (int64_t i = 0; i < k; ++i)
        for (int m = 0; m < mr; ++m) {
            const float xi = x[m * x_stride + i];
            for (int c = 0; c < I8_TILE; ++c) acc[m][c] += xi * (float)wt[i * I8_TILE + c];
        }
}
#endif

void linear_i8_packed(const float *restrict x, const int8_t *restrict w, const float *restrict scale,
                             const float *restrict bias, float *restrict out, int64_t rows, int64_t n, int64_t k,
                             int64_t x_stride, int64_t threads)
{
#pragma omp parallel for num_threads(threads) if (n * k >= 262144) schedule(static)
    for (int64_t b = 0; b < n / I8_TILE; ++b) {
        const int8_t *wt = w + b * I8_TILE * k;
        for (int64_t m0 = 0; m0 < rows; m0 += 4) { /* a constant mr keeps the accumulators in registers */
            float acc[4][I8_TILE];
            const float *xm = x + m0 * x_stride;
            const int64_t mr = rows - m0 < 4 ? rows - m0 : 4;
            switch (mr) {
            case 4: i8_tile(xm, x_stride, wt, k, 4, acc); break;
            case 3: i8_tile(xm, x_stride, wt, k, 3, acc); break;
            case 2: i8_tile(xm, x_stride, wt, k, 2, acc); break;
            default: i8_tile(xm, x_stride, wt, k, 1, acc); break;
            }
            for (int64_t m = 0; m < mr; ++m)
                for (int64_t c = 0; c < I8_TILE; ++c) {
                    const int64_t j = b * I8_TILE + c;
                    const float y = acc[m][c] * scale[j];
                    out[(m0 + m) * n + j] = bias ? y + bias[j] : y;
                }
        }
    }
}
