/* vmath.h: glibc's vector math at the register width, expf of VLEN lanes: libmvec on
 * x86 (AVX-512: 16 lanes, AVX2: 8), libm lane by lane on NEON (AArch64 glibc ships
 * libmvec only from 2.38); and functions the compiler inlines: lane-wise max / min,
 * exp (vexp_inline, vexp_split) and 2 Phi (vphi2, for the exact GELU).
 * Shared by every kernel in this folder, which defines VLEN (floats per vector
 * register), its vector type vf and one NBP_ISA_<isa> (isa.h: the intrinsics' headers)
 * before including it. cpu_build.py links libmvec on x86 and hashes this file into
 * every library's cache key.
 */
#ifndef NBP_VMATH_H
#define NBP_VMATH_H

#include <math.h>
#include <stdint.h>

/* libmvec's argument type: the kernels' vf may be a less aligned variant of it */
typedef float vf_native __attribute__((vector_size(VLEN * 4)));

#if defined(NBP_ISA_AVX512)
vf_native _ZGVeN16v_expf(vf_native x);
static inline vf vexp(vf x) { return (vf)_ZGVeN16v_expf((vf_native)x); }
#elif defined(NBP_ISA_AVX2)
vf_native _ZGVdN8v_expf(vf_native x);
static inline vf vexp(vf x) { return (vf)_ZGVdN8v_expf((vf_native)x); }
#else
static inline vf vexp(vf x) {
    for (int i = 0; i < VLEN; i++)
        x[i] = expf(x[i]);
    return x;
}
#endif

typedef int32_t vmath_vi __attribute__((vector_size(VLEN * 4)));

/* lane-wise max and min: v > m ? v : m and v < m ? v : m (maxps / minps on x86 compute
 * exactly these, so every build gives the same lanes): a NaN in v gives m, a NaN in m
 * stays (vexp_inline's and vphi2's caps keep NaN by passing x second) */
static inline vf vmax(vf v, vf m) {
#if defined(NBP_ISA_AVX512)
    return (vf)_mm512_max_ps((__m512)v, (__m512)m);
#elif defined(NBP_ISA_AVX2)
    return (vf)_mm256_max_ps((__m256)v, (__m256)m);
#else
    vmath_vi up = v > m;
    return (vf)(((vmath_vi)v & up) | ((vmath_vi)m & ~up));
#endif
}

static inline vf vmin(vf v, vf m) {
#if defined(NBP_ISA_AVX512)
    return (vf)_mm512_min_ps((__m512)v, (__m512)m);
#elif defined(NBP_ISA_AVX2)
    return (vf)_mm256_min_ps((__m256)v, (__m256)m);
#else
    vmath_vi down = v < m;
    return (vf)(((vmath_vi)v & down) | ((vmath_vi)m & ~down));
#endif
}

/* 2^n exp(r), r in [-ln 2 / 2, ln 2 / 2] (n integral), zero in the lanes of under: the
 * polynomial of vexp_inline and vexp_split */
static inline vf vexp_reduced(vf n, vf r, vmath_vi under) {
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf y = p * (r * r) + r + 1.0f;
    vmath_vi e = (__builtin_convertvector(n, vmath_vi) + 127) << 23;   /* 2^n, n in [-126, 128] */
    return (vf)((vmath_vi)(y * (vf)e) & ~under);
}

/* exp of VLEN lanes, inline: Cephes' expf (range reduction by ln 2 in two parts, a
 * degree-6 polynomial; within 2 ulp of expf over the range). For softmaxes, which call
 * it once per vector of scores: libmvec's is a call with its own special-case checks
 * (about 55 cycles a vector in decode attention's softmax on a Zen 4, a fifth of the
 * kernel with the cache in L2), libm's on NEON one call per lane. x below -87.33 (and
 * -inf) gives 0, not expf's subnormals; NaN stays NaN; x above 88.72 gives inf. */
static inline vf vexp_inline(vf x) {
    const vf lo = (vf){0} + -87.33654f, hi = (vf){0} + 88.72283f;
    vmath_vi under = x < lo;
    x = vmin(hi, x);   /* NaN kept */
    const vf magic = (vf){0} + 12582912.0f;   /* 1.5 2^23: t - magic rounds to an integer */
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
    return vexp_reduced(n, r, under);
}

/* exp(hi + lo) for hi + lo <= 88 (0 below -87.33), where hi is exact and large and lo
 * small: the reduction subtracts n ln 2 from hi (exact, Cody-Waite) before lo joins, so
 * hi + lo is never rounded to hi's grid (at hi = -64 that alone is 4e-6 relative). */
static inline vf vexp_split(vf hi, vf lo) {
    const vf magic = (vf){0} + 12582912.0f;
    vmath_vi under = hi + lo < -87.33654f;
    vf n = ((hi + lo) * 1.44269504088896341f + magic) - magic;
    vf r = (hi - n * 0.693359375f) + (lo - n * -2.12194440e-4f);
    return vexp_reduced(n, r, under);
}

/* 2 Phi(x) = erfc(-x / sqrt 2) of VLEN lanes (Phi: the standard normal CDF), inline:
 * x Phi(x) within 5.5e-7 relative of the exact GELU down to |x Phi(x)| = 1e-37 (x above
 * -13.1; every 7th float32 in [-15, 15], checked in C; tests/test_packed_linear.py sweeps
 * it), where glibc's erfcf of x rounded times 1/sqrt 2 was 1.2e-5 off near x = -13.
 * erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z = |x| / sqrt 2 >= 0, with the
 * Chebyshev fit P of Numerical Recipes' erfcc (fractional error below 1.2e-7); erfc(-z) =
 * 2 - erfc(z). z^2 = x^2 / 2 comes from x's halves (xh: its top 12 bits, xh^2 exact), so
 * rounding x / sqrt 2 does not enter the exponent. |x| is capped at 30 (2 Phi is 0 or 2
 * in float32 beyond); NaN stays NaN. */
static inline vf vphi2(vf x) {
    const vf cap = (vf){0} + 30.0f;
    x = vmin(cap, vmax(-cap, x));   /* NaN kept */
    const vmath_vi negative = x < 0;
    const vf z = (vf)((vmath_vi)x & 0x7fffffff) * 0.70710678118654752440f;
    const vf t = 1.0f / (1.0f + 0.5f * z);
    vf p = (vf){0} + 0.17087277f;
    p = p * t + -0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t + -1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t + -0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t + -1.26551223f;
    const vf xh = (vf)((vmath_vi)x & (int32_t)0xfffff000), xl = x - xh;
    const vf e = t * vexp_split(-0.5f * (xh * xh), -0.5f * ((xh + x) * xl) + p);
    return (vf)(((vmath_vi)e & negative) | ((vmath_vi)(2.0f - e) & ~negative));
}

#endif
