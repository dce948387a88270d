/* panel_cols.h: the columns of one output panel that exist, loaded and stored,
 * and the optional activation applied to them after the product.
 *
 * A panel holds 16 output columns; the last panel of a layer whose width is not
 * a multiple of 16 is partial. Shared by packed_linear.c and int8_linear.c,
 * which define VLEN (floats per vector register), the vector type vf and one
 * NBP_ISA_<isa> before including it. cpu_build.py hashes this file into every
 * library's cache key, and links both libraries with libmvec on x86 (erfcf).
 */
#ifndef NBP_PANEL_COLS_H
#define NBP_PANEL_COLS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* VLEN floats of src[c : n_out] zero-padded (bias and scales of a partial panel) */
static inline vf load_cols(const float *src, int64_t n_out, int64_t c) {
    if (n_out - c >= VLEN)
        return *(const vf *)(src + c);
    float buf[VLEN] = {0};
    if (n_out > c)
        memcpy(buf, src + c, (size_t)(n_out - c) * sizeof(float));
    return *(const vf *)buf;
}

/* dst[c : min(c + VLEN, n_out)] = the first lanes of v (nothing when c >= n_out) */
static inline void store_cols(float *dst, int64_t n_out, int64_t c, vf v) {
    if (n_out - c >= VLEN) {
        *(vf *)(dst + c) = v;
    } else if (n_out > c) {
        float buf[VLEN];
        *(vf *)buf = v;
        memcpy(dst + c, buf, (size_t)(n_out - c) * sizeof(float));
    }
}

/* Activation codes of the entry points' act argument (_cpu_launch.ACTS). */
enum { ACT_NONE = 0, ACT_GELU = 1 };

/* erfcf lane by lane: glibc's vector erfcf (libmvec) on x86, erfcf per lane on NEON */
typedef float vf_native __attribute__((vector_size(VLEN * 4)));
#if defined(NBP_ISA_AVX512)
vf_native _ZGVeN16v_erfcf(vf_native x);
static inline vf verfc(vf x) { return (vf)_ZGVeN16v_erfcf((vf_native)x); }
#elif defined(NBP_ISA_AVX2)
vf_native _ZGVdN8v_erfcf(vf_native x);
static inline vf verfc(vf x) { return (vf)_ZGVdN8v_erfcf((vf_native)x); }
#else
static inline vf verfc(vf x) {
    for (int i = 0; i < VLEN; i++)
        x[i] = erfcf(x[i]);
    return x;
}
#endif

/* Exact GELU (torch.nn.GELU(approximate='none')), x Phi(x) = x/2 erfc(-x / sqrt 2):
 * erfc keeps its relative accuracy where 1 + erf(x / sqrt 2) would cancel (x < 0;
 * torch's float32 GELU loses most of its bits there), so within a few ulp of the
 * exact value (tens of ulp below x = -5, from rounding x / sqrt 2). */
static inline vf gelu(vf x) {
    return x * 0.5f * verfc(x * -0.70710678118654752440f);
}

/* y[m][c0 : min(c0 + width, n_out)] = gelu(itself) for m < rows: applied to a
 * group of panels right after its stores, while they are in L1 */
static void gelu_cols(float *y, int64_t rows, int64_t n_out, int64_t c0, int64_t width) {
    const int64_t end = c0 + width < n_out ? c0 + width : n_out;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t c = c0; c < end; c += VLEN)
            store_cols(y + m * n_out, end, c, gelu(load_cols(y + m * n_out, end, c)));
}

#endif
