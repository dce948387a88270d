/* vmath.h: glibc's vector math at the register width, expf and erfcf of VLEN lanes:
 * libmvec on x86 (AVX-512: 16 lanes, AVX2: 8), libm lane by lane on NEON (AArch64
 * glibc ships libmvec only from 2.38); and vexp_inline, an exp the compiler inlines.
 * Shared by every kernel in this folder, which
 * defines VLEN (floats per vector register), its vector type vf and one NBP_ISA_<isa>
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
vf_native _ZGVeN16v_erfcf(vf_native x);
static inline vf vexp(vf x) { return (vf)_ZGVeN16v_expf((vf_native)x); }
static inline vf verfc(vf x) { return (vf)_ZGVeN16v_erfcf((vf_native)x); }
#elif defined(NBP_ISA_AVX2)
vf_native _ZGVdN8v_expf(vf_native x);
vf_native _ZGVdN8v_erfcf(vf_native x);
static inline vf vexp(vf x) { return (vf)_ZGVdN8v_expf((vf_native)x); }
static inline vf verfc(vf x) { return (vf)_ZGVdN8v_erfcf((vf_native)x); }
#else
static inline vf vexp(vf x) {
    for (int i = 0; i < VLEN; i++)
        x[i] = expf(x[i]);
    return x;
}
static inline vf verfc(vf x) {
    for (int i = 0; i < VLEN; i++)
        x[i] = erfcf(x[i]);
    return x;
}
#endif

typedef int32_t vmath_vi __attribute__((vector_size(VLEN * 4)));

/* exp of VLEN lanes, inline: Cephes' expf (range reduction by ln 2 in two parts, a
 * degree-6 polynomial; within 2 ulp of expf over the range). For softmaxes, which call
 * it once per vector of scores: libmvec's is a call with its own special-case checks
 * (about 55 cycles a vector in decode attention's softmax on a Zen 4, a fifth of the
 * kernel with the cache in L2), libm's on NEON one call per lane. x below -87.33 (and
 * -inf) gives 0, not expf's subnormals; NaN stays NaN; x above 88.72 gives inf. */
static inline vf vexp_inline(vf x) {
    const vf lo = (vf){0} + -87.33654f, hi = (vf){0} + 88.72283f;
    vmath_vi under = x < lo, over = x > hi;
    x = (vf)(((vmath_vi)hi & over) | ((vmath_vi)x & ~over));   /* NaN compares false: kept */
    const vf magic = (vf){0} + 12582912.0f;   /* 1.5 2^23: t - magic rounds to an integer */
    vf n = (x * 1.44269504088896341f + magic) - magic;
    vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
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

#endif
