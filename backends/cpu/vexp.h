/* exp for the kernels' softmax and SiLU, shared by kernels.c and attention.c. */
#ifndef KILN_VEXP_H
#define KILN_VEXP_H
#include <stdint.h>

/* exp written so the compiler vectorises loops that call it: 2^n * p(r) with r = x - n ln 2 in
 * [-ln2/2, ln2/2] and a degree-6 polynomial (within 2 ulp of expf over the clamped range). */
static inline float vexpf(float x)
{
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = (x * 1.44269504089f + 12582912.f) - 12582912.f; /* round to nearest: 1.5 * 2^23 */
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* vexpf on 8 lanes, the same steps. gcc vectorises vexpf's clamps only with AVX-512's masks: for AVX2 it either
 * keeps the loop scalar or (with -fno-trapping-math) computes each side of the clamp, and in silu the speculated
 * g / (1 + e^88) is subnormal, a microcode assist per lane. vmaxps / vminps are the clamps without either. */
static inline __m256 vexpf8(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 magic = _mm256_set1_ps(12582912.f);
    const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504089f), magic), magic);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f),
                                      _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x));
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
#define VEXP8 1
#endif
#endif
