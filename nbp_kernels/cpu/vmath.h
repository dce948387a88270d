/* vmath.h: glibc's vector math at the register width, expf and erfcf of VLEN lanes:
 * libmvec on x86 (AVX-512: 16 lanes, AVX2: 8), libm lane by lane on NEON (AArch64
 * glibc ships libmvec only from 2.38). Shared by every kernel in this folder, which
 * defines VLEN (floats per vector register), its vector type vf and one NBP_ISA_<isa>
 * before including it. cpu_build.py links libmvec on x86 and hashes this file into
 * every library's cache key.
 */
#ifndef NBP_VMATH_H
#define NBP_VMATH_H

#include <math.h>

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

#endif
