/* int8 linears behind kiln::linear_w8a8_packed and kiln::linear_int8_packed on the reference backend, compiled
 * into the same extension module as kernels.c (which holds their Python bindings). Both read weights that
 * backend "reference" stored in tiles when it lowered the graph (ops/quant.py packs them), so each tile
 * streams front to back; ops/quant.py's references are the specification. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define PARALLEL_MIN 65536 /* as in kernels.c: below this many elements one thread does the work */

/* W8A8 (kiln::linear_w8a8_packed): each row of x (times input_scale) is quantized to int8 with its own scale,
 * exactly as ops/quant.py quantize_tokens does, and stored offset by 128 as uint8 so the int8 x int8 dot products
 * can use AVX-512 VNNI (u8 x s8 -> s32, 64 products an instruction); the offset is taken back out with each
 * weight row's sum (a dot with a vector of ones, in the same pass). The int32 dots are exact and the float
 * epilogue is the reference's, (acc * x_scale) * w_scale + bias, so results equal it bit for bit.
 * Weights come in tiles of 4 rows x 64 columns, [n/4][k/64][4][64] (ops/quant.py pack_w8a8): a 4-row block is
 * then read front to back, which streams at about twice the speed of four interleaved rows of HF's layout on
 * this kind of CPU. Each block stays in L1 while every row of x passes over it. */
#define W8A8_ROWS 4
#define W8A8_COLS 64
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
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
#else
static inline void w8a8_tile(const uint8_t *restrict x, const int8_t *restrict wb, int64_t k, int mr,
                             int32_t *acc, int32_t *wsum)
{
    for (int r = 0; r < W8A8_ROWS; ++r) {
        int32_t total = 0;
        for (int64_t c = 0; c < k / W8A8_COLS; ++c)
            for (int64_t i = 0; i < W8A8_COLS; ++i) total += wb[(c * W8A8_ROWS + r) * W8A8_COLS + i];
        if (wsum) wsum[r] = total;
        for (int m = 0; m < mr; ++m) {
            int32_t dot = 0;
            for (int64_t c = 0; c < k / W8A8_COLS; ++c) {
                const int8_t *w = wb + (c * W8A8_ROWS + r) * W8A8_COLS;
                const uint8_t *xm = x + m * k + c * W8A8_COLS;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < W8A8_COLS; ++i) dot += (int32_t)xm[i] * (int32_t)w[i];
            }
            acc[m * W8A8_ROWS + r] = dot;
        }
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
        q[i] = (uint8_t)((int32_t)r + 128);
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
        int32_t wsum[W8A8_ROWS], acc[4 * W8A8_ROWS];
        for (int64_t m0 = 0; m0 < rows; m0 += 4) { /* 4 x 4 accumulators: a constant mr lets them stay in registers */
            const uint8_t *xm = xq + m0 * k;
            int32_t *ws = m0 == 0 ? wsum : NULL;
            const int64_t mr = rows - m0 < 4 ? rows - m0 : 4;
            switch (mr) {
            case 4: w8a8_tile(xm, wb, k, 4, acc, ws); break;
            case 3: w8a8_tile(xm, wb, k, 3, acc, ws); break;
            case 2: w8a8_tile(xm, wb, k, 2, acc, ws); break;
            default: w8a8_tile(xm, wb, k, 1, acc, ws); break;
            }
            for (int64_t m = 0; m < mr; ++m)
                for (int64_t r = 0; r < W8A8_ROWS; ++r) {
                    const int64_t j = b * W8A8_ROWS + r;
                    const float y = (float)(acc[m * W8A8_ROWS + r] - 128 * wsum[r]) * xs[m0 + m] * scale[j];
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
/* Four k steps per iteration into four accumulators per row: the FMA chains overlap. */
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
