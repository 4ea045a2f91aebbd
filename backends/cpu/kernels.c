/* float32 CPU kernels behind kiln's ops on the reference backend, as a small CPython extension module (the
 * bindings at the end take data pointers and sizes; a call costs well under a microsecond, where ctypes
 * costs several). Built on first use by backends/cpu/kernels.py and chosen by backends/cpu/lowering.py; the
 * torch references in ops/attention.py and ops/fused.py are the specification, and every function here is tested
 * against them. backends/cpu/build.py compiles this file once per instruction-set level (AVX-512 VNNI, AVX2 + FMA,
 * the x86-64 baseline): the loops below are written for the compiler to vectorise at each of them, with
 * `omp simd` where it needs to be told that a reduction may be reordered. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Every kernel takes `threads` (torch's intra-op thread count, so kiln's C and torch's ops use the same cores);
 * rows below PARALLEL_MIN elements in total run on one thread: forking costs more than the work. */
#define PARALLEL_MIN 65536

#include "vexp.h"


/* The step's K and V rows into their cache slots (a row is all KV heads of one token). k and v may be
 * strided views (a split of the fused qkv projection): row strides are passed, the last dims contiguous.
 * Slot -1 is a padding row and is skipped; any other slot outside [0, num_slots) writes nothing and returns
 * -1, so a bad slot mapping is an error, never a write out of bounds. */
static int64_t cache_write_f32(
    const float *restrict k, const float *restrict v, float *restrict k_cache, float *restrict v_cache,
    const int64_t *restrict slots, int64_t num_tokens, int64_t num_slots, int64_t k_row, int64_t v_row,
    int64_t k_stride, int64_t v_stride)
{
    for (int64_t t = 0; t < num_tokens; ++t)
        if (slots[t] < -1 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < num_tokens; ++t) {
        if (slots[t] < 0) continue;
        memcpy(k_cache + slots[t] * k_row, k + t * k_stride, sizeof(float) * k_row);
        memcpy(v_cache + slots[t] * v_row, v + t * v_stride, sizeof(float) * v_row);
    }
    return 0;
}

/* RMSNorm of each row, statistics in float32: out = x * rsqrt(mean(x^2) + eps) * (w + weight_offset).
 * With residual != NULL the row is first x + residual, stored to residual_out (the add before the norm). */
static void rms_norm_f32(
    const float *restrict x, const float *restrict residual, const float *restrict w, float *restrict out,
    float *restrict residual_out, int64_t rows, int64_t dim, int64_t x_stride, int64_t res_stride, float eps,
    float weight_offset, int64_t threads)
{
#pragma omp parallel for num_threads(threads) if (rows * dim >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * x_stride;
        float *o = out + r * dim;
        if (residual) {
            const float *rr = residual + r * res_stride;
            float *ro = residual_out + r * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) ro[i] = xr[i] + rr[i];
            xr = ro;
        }
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < dim; ++i) sq += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(sq / (float)dim + eps);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv * (w[i] + weight_offset);
    }
}

/* Gated SiLU on the fused gate/up projection: out[r, i] = silu(gate[r, i]) * up[r, i], gate_up [rows, 2I]. */
static void silu_mul_f32(
    const float *restrict gate_up, float *restrict out, int64_t rows, int64_t inter, int64_t stride, int64_t threads)
{
#pragma omp parallel for num_threads(threads) if (rows * inter >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; ++r) {
        const float *g = gate_up + r * stride, *u = g + inter;
        float *o = out + r * inter;
        int64_t i = 0;
#ifdef VEXP8
        for (; i + 8 <= inter; i += 8) {
            const __m256 gv = _mm256_loadu_ps(g + i);
            const __m256 e = vexpf8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e)),
                                                  _mm256_loadu_ps(u + i)));
        }
#endif
#pragma omp simd
        for (int64_t t = i; t < inter; ++t) o[t] = g[t] / (1.f + vexpf(-g[t])) * u[t];
    }
}

/* Rotary embedding of one [T, H, D] tensor (row stride x_stride, heads contiguous) into a contiguous out.
 * cos_sin [max_pos, rotary_dim] holds cos then sin; neox pairs (i, i + rotary_dim/2), else (2i, 2i + 1).
 * A position outside [0, max_pos) returns -1 before anything is read. */
__attribute__((optimize("fp-contract=off"))) /* exactly torch's mul-then-add arithmetic */
static int64_t rope_f32(
    const float *restrict x, float *restrict out, const int64_t *restrict positions, const float *restrict cos_sin,
    int64_t tokens, int64_t heads, int64_t dim, int64_t x_stride, int64_t rotary_dim, int64_t neox,
    int64_t max_pos, int64_t threads)
{
    for (int64_t t = 0; t < tokens; ++t)
        if (positions[t] < 0 || positions[t] >= max_pos) return -1;
    const int64_t half = rotary_dim / 2;
#pragma omp parallel for num_threads(threads) if (tokens * heads * dim >= PARALLEL_MIN)
    for (int64_t t = 0; t < tokens; ++t) {
        const float *c = cos_sin + positions[t] * rotary_dim, *s = c + half;
        for (int64_t h = 0; h < heads; ++h) {
            const float *xh = x + t * x_stride + h * dim;
            float *o = out + (t * heads + h) * dim;
            if (neox) {
#pragma omp simd
                for (int64_t i = 0; i < half; ++i) {
                    o[i] = xh[i] * c[i] - xh[i + half] * s[i];
                    o[i + half] = xh[i + half] * c[i] + xh[i] * s[i];
                }
            } else {
                for (int64_t i = 0; i < half; ++i) {
                    o[2 * i] = xh[2 * i] * c[i] - xh[2 * i + 1] * s[i];
                    o[2 * i + 1] = xh[2 * i + 1] * c[i] + xh[2 * i] * s[i];
                }
            }
            for (int64_t i = rotary_dim; i < dim; ++i) o[i] = xh[i];
        }
    }
    return 0;
}

/* out = (x @ w.T) * scale + bias for a few rows of x (decode at small batch), w [n, k] in HF's layout: float32,
 * or int8 with one scale per output channel (weight-only int8: a quarter of the bytes to stream). Eight weight
 * rows at a time are streamed once and dotted with every row of x: at 1 to 16 rows torch's GEMM over this
 * layout runs well below memory speed, and this loop reaches it. scale and bias may be NULL. */
#define SMALL_LINEAR(NAME, WT)                                                                                      \
    static void NAME(const float *restrict x, const WT *restrict w, const float *restrict scale,                   \
                     const float *restrict bias, float *restrict out, int64_t rows, int64_t n, int64_t k,          \
                     int64_t x_stride, int64_t threads)                                                            \
    {                                                                                                              \
        _Pragma("omp parallel for num_threads(threads) if (n * k >= 262144) schedule(static)")                    \
        for (int64_t j = 0; j < n; j += 8) {                                                                       \
            const int64_t jn = n - j < 8 ? n - j : 8;                                                              \
            const WT *wj = w + j * k;                                                                              \
            for (int64_t m = 0; m < rows; ++m) {                                                                   \
                const float *xm = x + m * x_stride;                                                                \
                float *o = out + m * n + j;                                                                        \
                if (jn == 8) {                                                                                     \
                    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f, s4 = 0.f, s5 = 0.f, s6 = 0.f, s7 = 0.f;          \
                    _Pragma("omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)")                              \
                    for (int64_t i = 0; i < k; ++i) {                                                              \
                        const float xi = xm[i];                                                                    \
                        s0 += (float)wj[i] * xi; s1 += (float)wj[k + i] * xi;                                      \
                        s2 += (float)wj[2 * k + i] * xi; s3 += (float)wj[3 * k + i] * xi;                          \
                        s4 += (float)wj[4 * k + i] * xi; s5 += (float)wj[5 * k + i] * xi;                          \
                        s6 += (float)wj[6 * k + i] * xi; s7 += (float)wj[7 * k + i] * xi;                          \
                    }                                                                                              \
                    o[0] = s0; o[1] = s1; o[2] = s2; o[3] = s3; o[4] = s4; o[5] = s5; o[6] = s6; o[7] = s7;        \
                } else {                                                                                           \
                    for (int64_t jj = 0; jj < jn; ++jj) {                                                          \
                        float s = 0.f;                                                                             \
                        _Pragma("omp simd reduction(+ : s)")                                                       \
                        for (int64_t i = 0; i < k; ++i) s += (float)wj[jj * k + i] * xm[i];                        \
                        o[jj] = s;                                                                                 \
                    }                                                                                              \
                }                                                                                                  \
                for (int64_t jj = 0; jj < jn; ++jj) {                                                              \
                    if (scale) o[jj] *= scale[j + jj];                                                             \
                    if (bias) o[jj] += bias[j + jj];                                                               \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }

SMALL_LINEAR(small_linear_f32, float)
SMALL_LINEAR(small_linear_i8, int8_t)

/* Row-wise argmax, the first index of the maximum (torch.argmax's choice): the greedy sampler's one pass over
 * [batch, vocab] logits, at memory speed where torch's CPU argmax runs a scalar loop. NaNs are not maxima. */
static void argmax_rows_f32(const float *x, int64_t *out, int64_t rows, int64_t cols, int64_t stride,
                            int64_t threads)
{
#pragma omp parallel for num_threads(threads) if (rows * cols >= PARALLEL_MIN)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int64_t j = 0; j < cols; j++) m = row[j] > m ? row[j] : m;
        int64_t at = 0;
        for (; at + 32 <= cols; at += 32) { /* find the block holding the first maximum, 32 at a time */
            int hit = 0;
#pragma omp simd reduction(| : hit)
            for (int64_t j = at; j < at + 32; j++) hit |= row[j] == m;
            if (hit) break;
        }
        while (at < cols && !(row[at] == m)) at++;
        out[r] = at < cols ? at : 0;
    }
}

/* Decode attention is in attention.c, the int8 linears (weight tiles; AVX-512 VNNI, AVX2 and portable paths) in
 * quant.c, both in the same module. */
void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int32_t *block_tables,
                      const int32_t *seq_lens, float *out, int64_t num_seqs, int64_t num_heads, int64_t kv_heads,
                      int64_t head_dim, int64_t v_dim, int64_t block_size, int64_t table_width, float scale,
                      int64_t window, float softcap, int64_t threads);
void linear_w8a8_packed(const float *x, const float *in_scale, const int8_t *w, const float *scale,
                        const float *bias, float *out, int64_t rows, int64_t n, int64_t k, int64_t x_stride,
                        int64_t threads);
void linear_i8_packed(const float *x, const int8_t *w, const float *scale, const float *bias, float *out,
                      int64_t rows, int64_t n, int64_t k, int64_t x_stride, int64_t threads);

/* ---- Python bindings: each takes the kernel's arguments in order (pointers as ints, None for NULL). ---- */

static int64_t arg_i(PyObject *o) { return PyLong_AsLongLong(o); }
static void *arg_p(PyObject *o) { return o == Py_None ? NULL : PyLong_AsVoidPtr(o); }
static float arg_f(PyObject *o) { return (float)PyFloat_AsDouble(o); }

static int arity(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs == expected) return 1;
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, expected, nargs);
    return 0;
}

static PyObject *py_paged_decode(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("paged_decode", n, 17)) return NULL;
    const float *q = arg_p(a[0]), *k = arg_p(a[1]), *v = arg_p(a[2]);
    const int32_t *tables = arg_p(a[3]), *lens = arg_p(a[4]);
    float *out = arg_p(a[5]);
    int64_t s = arg_i(a[6]), hq = arg_i(a[7]), hkv = arg_i(a[8]), d = arg_i(a[9]), dv = arg_i(a[10]);
    int64_t bs = arg_i(a[11]), width = arg_i(a[12]), window = arg_i(a[14]), threads = arg_i(a[16]);
    float scale = arg_f(a[13]), softcap = arg_f(a[15]);
    if (PyErr_Occurred()) return NULL;
    paged_decode_f32(q, k, v, tables, lens, out, s, hq, hkv, d, dv, bs, width, scale, window, softcap, threads);
    Py_RETURN_NONE;
}

static PyObject *py_cache_write(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("cache_write", n, 11)) return NULL;
    const float *k = arg_p(a[0]), *v = arg_p(a[1]);
    float *kc = arg_p(a[2]), *vc = arg_p(a[3]);
    const int64_t *slots = arg_p(a[4]);
    int64_t t = arg_i(a[5]), num_slots = arg_i(a[6]), k_row = arg_i(a[7]), v_row = arg_i(a[8]);
    int64_t k_stride = arg_i(a[9]), v_stride = arg_i(a[10]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(cache_write_f32(k, v, kc, vc, slots, t, num_slots, k_row, v_row, k_stride, v_stride));
}

static PyObject *py_rms_norm(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("rms_norm", n, 12)) return NULL;
    const float *x = arg_p(a[0]), *res = arg_p(a[1]), *w = arg_p(a[2]);
    float *out = arg_p(a[3]), *res_out = arg_p(a[4]);
    int64_t rows = arg_i(a[5]), dim = arg_i(a[6]), x_stride = arg_i(a[7]), res_stride = arg_i(a[8]);
    float eps = arg_f(a[9]), offset = arg_f(a[10]);
    int64_t threads = arg_i(a[11]);
    if (PyErr_Occurred()) return NULL;
    rms_norm_f32(x, res, w, out, res_out, rows, dim, x_stride, res_stride, eps, offset, threads);
    Py_RETURN_NONE;
}

static PyObject *py_silu_mul(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("silu_mul", n, 6)) return NULL;
    const float *gate_up = arg_p(a[0]);
    float *out = arg_p(a[1]);
    int64_t rows = arg_i(a[2]), inter = arg_i(a[3]), stride = arg_i(a[4]), threads = arg_i(a[5]);
    if (PyErr_Occurred()) return NULL;
    silu_mul_f32(gate_up, out, rows, inter, stride, threads);
    Py_RETURN_NONE;
}

static PyObject *py_rope(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("rope", n, 12)) return NULL;
    const float *x = arg_p(a[0]), *cos_sin = arg_p(a[3]);
    float *out = arg_p(a[1]);
    const int64_t *pos = arg_p(a[2]);
    int64_t t = arg_i(a[4]), h = arg_i(a[5]), d = arg_i(a[6]), stride = arg_i(a[7]), rd = arg_i(a[8]);
    int64_t neox = arg_i(a[9]), max_pos = arg_i(a[10]), threads = arg_i(a[11]);
    if (PyErr_Occurred()) return NULL;
    return PyLong_FromLongLong(rope_f32(x, out, pos, cos_sin, t, h, d, stride, rd, neox, max_pos, threads));
}

static PyObject *py_small_linear(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("small_linear", n, 11)) return NULL;
    const float *x = arg_p(a[0]), *scale = arg_p(a[2]), *bias = arg_p(a[3]);
    const void *w = arg_p(a[1]);
    float *out = arg_p(a[4]);
    int64_t rows = arg_i(a[5]), cols = arg_i(a[6]), k = arg_i(a[7]), stride = arg_i(a[8]), threads = arg_i(a[9]);
    int64_t int8 = arg_i(a[10]);
    if (PyErr_Occurred()) return NULL;
    if (int8)
        small_linear_i8(x, w, scale, bias, out, rows, cols, k, stride, threads);
    else
        small_linear_f32(x, w, scale, bias, out, rows, cols, k, stride, threads);
    Py_RETURN_NONE;
}

static PyObject *py_linear_w8a8_packed(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("linear_w8a8_packed", n, 11)) return NULL;
    const float *x = arg_p(a[0]), *in_scale = arg_p(a[1]), *scale = arg_p(a[3]), *bias = arg_p(a[4]);
    const int8_t *w = arg_p(a[2]);
    float *out = arg_p(a[5]);
    int64_t rows = arg_i(a[6]), cols = arg_i(a[7]), k = arg_i(a[8]), stride = arg_i(a[9]), threads = arg_i(a[10]);
    if (PyErr_Occurred()) return NULL;
    linear_w8a8_packed(x, in_scale, w, scale, bias, out, rows, cols, k, stride, threads);
    Py_RETURN_NONE;
}

static PyObject *py_linear_i8_packed(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("linear_i8_packed", n, 10)) return NULL;
    const float *x = arg_p(a[0]), *scale = arg_p(a[2]), *bias = arg_p(a[3]);
    const int8_t *w = arg_p(a[1]);
    float *out = arg_p(a[4]);
    int64_t rows = arg_i(a[5]), cols = arg_i(a[6]), k = arg_i(a[7]), stride = arg_i(a[8]), threads = arg_i(a[9]);
    if (PyErr_Occurred()) return NULL;
    linear_i8_packed(x, w, scale, bias, out, rows, cols, k, stride, threads);
    Py_RETURN_NONE;
}

static PyObject *py_argmax_rows(PyObject *self, PyObject *const *a, Py_ssize_t n)
{
    if (!arity("argmax_rows", n, 6)) return NULL;
    const float *x = arg_p(a[0]);
    int64_t *out = arg_p(a[1]);
    int64_t rows = arg_i(a[2]), cols = arg_i(a[3]), stride = arg_i(a[4]), threads = arg_i(a[5]);
    if (PyErr_Occurred()) return NULL;
    argmax_rows_f32(x, out, rows, cols, stride, threads);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"argmax_rows", (PyCFunction)(void (*)(void))py_argmax_rows, METH_FASTCALL, NULL},
    {"linear_i8_packed", (PyCFunction)(void (*)(void))py_linear_i8_packed, METH_FASTCALL, NULL},
    {"linear_w8a8_packed", (PyCFunction)(void (*)(void))py_linear_w8a8_packed, METH_FASTCALL, NULL},
    {"small_linear", (PyCFunction)(void (*)(void))py_small_linear, METH_FASTCALL, NULL},
    {"paged_decode", (PyCFunction)(void (*)(void))py_paged_decode, METH_FASTCALL, NULL},
    {"cache_write", (PyCFunction)(void (*)(void))py_cache_write, METH_FASTCALL, NULL},
    {"rms_norm", (PyCFunction)(void (*)(void))py_rms_norm, METH_FASTCALL, NULL},
    {"silu_mul", (PyCFunction)(void (*)(void))py_silu_mul, METH_FASTCALL, NULL},
    {"rope", (PyCFunction)(void (*)(void))py_rope, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kiln_cpu", NULL, -1, methods};

/* The level this library was compiled for (backends/cpu/build.py builds one per level), from the compiler's own
 * macros: what runs is what was built, whatever the flags said. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define KILN_ISA "avx512_vnni"
#define KILN_ISA_OK (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
#elif defined(__AVX2__) && defined(__FMA__)
#define KILN_ISA "avx2"
#define KILN_ISA_OK (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
#elif defined(__x86_64__)
#define KILN_ISA "scalar"
#define KILN_ISA_OK 1
#else
#define KILN_ISA "native"
#define KILN_ISA_OK 1
#endif

PyMODINIT_FUNC PyInit_kiln_cpu(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
#endif
    if (!(KILN_ISA_OK)) { /* a second guard behind build.py's choice: never run into an illegal instruction */
        PyErr_SetString(PyExc_ImportError, "kiln_cpu was built for " KILN_ISA ", which this CPU lacks");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "isa", KILN_ISA) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
