/* panel_cols.h: the columns of one output panel that exist, loaded and stored.
 *
 * A panel holds 16 output columns; the last panel of a layer whose width is not
 * a multiple of 16 is partial. Shared by packed_linear.c and int8_linear.c,
 * which define VLEN (floats per vector register) and the vector type vf before
 * including it. cpu_build.py hashes this file into every library's cache key.
 */
#ifndef NBP_PANEL_COLS_H
#define NBP_PANEL_COLS_H

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

#endif
