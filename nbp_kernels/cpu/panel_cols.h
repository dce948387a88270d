/* panel_cols.h: the columns of one output panel that exist, loaded and stored,
 * the optional activation and residual applied to them after the product, and the
 * optional LayerNorm of the input rows before it.
 *
 * A panel holds 16 output columns; the last panel of a layer whose width is not
 * a multiple of 16 is partial. Shared by packed_linear.c and int8_linear.c,
 * which define VLEN (floats per vector register), the vector type vf and one
 * NBP_ISA_<isa> before including it. cpu_build.py hashes this file into every
 * library's cache key; vphi2 comes from vmath.h.
 */
#ifndef NBP_PANEL_COLS_H
#define NBP_PANEL_COLS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "vmath.h"

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

/* Exact GELU (torch.nn.GELU(approximate='none')), x Phi(x) = x/2 erfc(-x / sqrt 2),
 * within 5.5e-7 relative of the exact value (vphi2: erfc keeps its relative accuracy where
 * 1 + erf(x / sqrt 2) would cancel, x < 0, where torch's float32 GELU loses most of its
 * bits). Inline, where glibc's erfcf was a call (libmvec; a call per lane on NEON) and
 * 20x less accurate near x = -13. */
static inline vf gelu(vf x) {
    return x * 0.5f * vphi2(x);
}

/* The epilogue of a group of panels, right after its stores, while they are in L1:
 * y[m][c0 : min(c0 + width, n_out)] = act(itself) + residual[m][same columns] for
 * m < rows (residual [rows][n_out] or NULL). The residual is added after the
 * activation, as the model's x + drop(fc2(...)). Without either it is not called,
 * so the plain kernels store exactly what they stored before it existed. */
static void epilogue_cols(float *y, const float *residual, int64_t rows, int64_t n_out,
                          int64_t c0, int64_t width, int act) {
    const int64_t end = c0 + width < n_out ? c0 + width : n_out;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t c = c0; c < end; c += VLEN) {
            vf v = load_cols(y + m * n_out, end, c);
            if (act == ACT_GELU)
                v = gelu(v);
            if (residual)
                v = v + load_cols(residual + m * n_out, end, c);
            store_cols(y + m * n_out, end, c, v);
        }
}

/* sum over k < K of (r[k] - shift), or of its square: float vectors (4 chains, so the
 * adds' latency does not bound it) over blocks of 16 vectors a chain, each block's sum
 * then added in double, so no float sum runs over more than 64 terms (x VLEN). */
static double row_sum(const float *r, int64_t K, float shift, int square) {
    double total = 0.0;
    int64_t k = 0;
    while (k + 4 * VLEN <= K) {
        vf acc[4] = {{0}, {0}, {0}, {0}};
        const int64_t end = k + 64 * VLEN < K ? k + 64 * VLEN : K;
        for (; k + 4 * VLEN <= end; k += 4 * VLEN)
            for (int c = 0; c < 4; c++) {
                vf d = *(const vf *)(r + k + c * VLEN) - shift;
                acc[c] += square ? d * d : d;
            }
        /* a tree in float, then one double add: a chain of VLEN double adds per
         * block was most of the time of a 16 x 384 normalisation */
        float t[VLEN];
        *(vf *)t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        for (int w = VLEN / 2; w > 0; w /= 2)
            for (int v = 0; v < w; v++)
                t[v] += t[v + w];
        total += t[0];
    }
    for (; k < K; k++) {
        const float d = r[k] - shift;
        total += square ? (double)d * d : d;
    }
    return total;
}

/* out[m] = LayerNorm(x[m]) for m < M (x, out [M][K]; torch.nn.functional.layer_norm
 * over the last dimension: biased variance, gamma / beta [K] or NULL for 1 / 0).
 * Two passes (mean, then squares about it: no cancellation), summed as row_sum says,
 * so within a float32 rounding or two of torch's. Runs before the parallel region: a
 * decode step's M x K rows are a few KiB, and vector passes over them, in cache, cost
 * less than waking the workers once more. */
static void layer_norm_rows(const float *x, int64_t M, int64_t K, const float *gamma,
                            const float *beta, float eps, float *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * K;
        float *o = out + m * K;
        const float mean = (float)(row_sum(r, K, 0.0f, 0) / (double)K);
        const float rstd = (float)(1.0 / __builtin_sqrt(row_sum(r, K, mean, 1) / (double)K
                                                        + (double)eps));
        int64_t k = 0;
        for (; k + VLEN <= K; k += VLEN) {
            vf v = (*(const vf *)(r + k) - mean) * rstd;
            if (gamma)
                v *= *(const vf *)(gamma + k);
            if (beta)
                v += *(const vf *)(beta + k);
            *(vf *)(o + k) = v;
        }
        for (; k < K; k++)
            o[k] = ((r[k] - mean) * rstd) * (gamma ? gamma[k] : 1.0f) + (beta ? beta[k] : 0.0f);
    }
}

#endif
