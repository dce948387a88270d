/* int8_linear: y = x @ W^T for few rows of x, with int8 weights (one fp32 scale
 * per output column) and the activations quantized per row here, at each call, to
 * int8 or to 16-bit integers, multiplied in exact int32 dot products.
 *
 * With weight-only int8 (packed_linear.c) a 16-row decode step is bound by its
 * fp32 FMAs, not by reading the weights; an integer dot-product instruction
 * does 4x the multiply-adds of an fp32 FMA. Weights are packed so that 4
 * consecutive k of 16 output columns are one 64-byte vector,
 * wp[panel][k / 4][16][4] (K zero-padded to Kp, a multiple of 4), streamed
 * once per call against register tiles of several rows (further row tiles
 * find the panels in L1/L2).
 *
 * Paths, all computing the same int32 sums (so the same floats):
 * - AVX512-VNNI (vpdpbusd: u8 x s8, 64 multiply-adds an instruction), in the
 *   avx512 build, used where the CPU has it (nbp_int8_vnni()) and the caller
 *   asks: x is shifted to u8 (xq + 128) and 128 x the column sums of the
 *   weight, precomputed at pack time, subtracted (exact in int32). Only the
 *   VNNI functions are compiled for VNNI (target attribute), so the rest of
 *   the library runs on AVX-512 CPUs without it.
 * - AVX-VNNI (vpdpbusd on ymm, 32 multiply-adds an instruction), in the avx2 build
 *   where the CPU has it (Intel cores since Alder Lake, AMD Zen 5), for int8 rows,
 *   more than one; the same u8 shift and correction.
 * - x86 without VNNI (the avx2 build, and the avx512 build on CPUs without
 *   VNNI): AVX2 vpmaddubsw with the sign trick (|xq| as u8 times the weight
 *   with xq's sign; a pair sums to at most 2 x 127 x 127, so it never
 *   saturates), then vpmaddwd by ones to int32.
 * - NEON: plain C loops for the compiler to vectorise.
 *
 * 16-bit activations (mode A16): each row is rounded to Q = min(32767,
 * (2^31 - 1) / (127 K)) levels (so no int32 sum can overflow: 15 bits for K up to
 * 516, 13.4 for K = 1536), against int8's 127: near float32 activations, at twice
 * the multiply-adds of an fp32 FMA per instruction. The weights are the same
 * packed int8, widened to int16 in registers (vpmovsxbw):
 * - AVX512-VNNI: vpdpwssd (s16 x s16 pairs, 32 multiply-adds an instruction), the
 *   widened dwords split into every column's k 0-1 and k 2-3 (two vpermt2d), each
 *   met by the row's pair as a broadcast;
 * - other x86: AVX2 vpmaddwd then vpaddd on the same split (vshufps, split_pairs);
 *   one row keeps the widened order, each int32 lane summing half the k of a column,
 *   the halves added at the end; NEON: plain C.
 *
 * Rounding: the sums are exact; the epilogue is float32 mul, mul, add in the
 * order reference.int8_linear gives, and cpu_build compiles this file with
 * -ffp-contract=off so no FMA fuses them: the results equal the reference's
 * bit for bit.
 *
 * Optional exact GELU on the outputs after the epilogue, as in packed_linear.c
 * (a few ulp from the exact GELU; not torch's float32 GELU bit for bit), then an
 * optional residual added; optional LayerNorm of the rows of x before they are
 * quantized (the quantization applies to the normalised rows).
 *
 * Threads: OpenMP over panel groups in torch's libgomp, as packed_linear.c.
 * nbp_kernels/int8_linear.py has the Python contract, nbp_kernels/reference.py
 * the semantics (quantize_rows, int8_linear).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "isa.h"   /* VLEN, X86, nbp_cpu_isa */

#define PANEL 16
#define PREFETCH 4096       /* bytes ahead in each weight stream */
#ifndef GROUP
#  define GROUP 3           /* panels per thread work item */
#endif
/* 16 rows x 1 panel: 16 of the 32 zmm as accumulators. For the 64000 x 384 head
 * at 16 rows on an AVX-512 Xeon, 1 thread: 1.6 ms, against 2.0 ms for 8 x 3 and
 * 4 x 6 (the overrides below compile the variants); 24 rows spilled. */
#ifndef VNNI_ROWS
#  define VNNI_ROWS 16
#  define VNNI_PANELS 1
#endif
#ifndef PORT_ROWS
#  define PORT_ROWS 4       /* 4 rows x 2 ymm per panel = 8 of the 16 ymm as accumulators */
#endif

typedef float vf __attribute__((vector_size(VLEN * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VLEN * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(VLEN * 4), aligned(4)));

/* the mode bits of nbp_int8_linear */
enum { MODE_VNNI = 1, MODE_A16 = 2 };
#ifndef A16_ROWS
#  define A16_ROWS 16       /* 16 rows x 1 zmm per panel = 16 of the 32 zmm as accumulators */
#endif
#ifndef PORT16_ROWS
#  define PORT16_ROWS 4     /* 4 rows x 2 ymm per panel = 8 of the 16 ymm */
#endif

#ifndef AVX_VNNI_ROWS
#  define AVX_VNNI_ROWS 6   /* 6 rows x 2 ymm per panel = 12 of the 16 ymm as accumulators */
#endif

/* Whether this library runs the VNNI path on this CPU: AVX512-VNNI in the avx512 build,
 * AVX-VNNI (the same dot products on ymm, without AVX-512) in the avx2 build. */
int nbp_int8_vnni(void) {
#if defined(NBP_ISA_AVX512)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") ? 1 : 0;
#elif defined(NBP_ISA_AVX2)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avxvnni") ? 1 : 0;
#else
    return 0;
#endif
}

#include "vmath.h"   /* vmax */

/* max |x[k]| (x finite), a vector at a time: GCC leaves the scalar form unvectorised
 * (a max is not reassociated without -ffast-math), one element per max latency,
 * which made quantizing x most of the time of a 16 x 1536 -> 384 product. Any
 * order gives the same maximum, so the same floats as reference.quantize_rows. */
static float abs_max(const float *x, int64_t K) {
    vf m[4] = {{0}, {0}, {0}, {0}};   /* 4 chains: the max's latency, not its rate, bound one */
    int64_t k = 0;
    for (; k + 4 * VLEN <= K; k += 4 * VLEN)
        for (int c = 0; c < 4; c++)
            m[c] = vmax((vf)(*(const vu *)(x + k + c * VLEN) & 0x7fffffffu), m[c]);
    /* the chains merged as vectors first: 4 VLEN lanes one by one were a chain of 64
     * dependent maxes on AVX-512 (~0.1 us a row, a quarter of a 16 x 384 call's
     * preparation) */
    for (int c = 1; c < 4; c++)
        m[0] = vmax(m[c], m[0]);
    float amax = 0.0f;
    for (int v = 0; v < VLEN; v++)
        amax = m[0][v] > amax ? m[0][v] : amax;
    for (; k < K; k++) {
        float a = x[k] < 0 ? -x[k] : x[k];
        amax = a > amax ? a : amax;
    }
    return amax;
}

/* The levels of 16-bit activations for in_features K: |sum| <= 127 Q K < 2^31 */
static float a16_levels(int64_t K) {
    const int64_t q = (int64_t)2147483647 / (127 * (K > 0 ? K : 1));
    return (float)(q < 32767 ? q : 32767);
}

/* reference.quantize_rows for one row, with `levels` (127 or a16_levels): x[K] ->
 * q[Kp] (zero-padded), int16 if a16, else uint8 + shift (128 gives the u8 of the
 * VNNI path); returns sx */
static float quantize_row(const float *x, int64_t K, int64_t Kp, void *q, float levels, int a16,
                          int shift) {
    const float amax = abs_max(x, K);
    const float inv = amax > 0 ? levels / amax : 0.0f;
    int16_t *q16 = q;
    uint8_t *q8 = q;
    for (int64_t k = 0; k < K; k++) {
        float v = __builtin_rintf(x[k] * inv);   /* the default rounding: half to even */
        v = v > levels ? levels : v < -levels ? -levels : v;
        if (a16)
            q16[k] = (int16_t)v;
        else
            q8[k] = (uint8_t)((int)v + shift);
    }
    for (int64_t k = K; k < Kp; k++) {   /* the weight there is 0: any value adds nothing */
        if (a16)
            q16[k] = 0;
        else
            q8[k] = (uint8_t)shift;
    }
    return amax / levels;
}

#include "panel_cols.h"

/* y[c0 : c0 + 16] of one row = float(acc - corr) * (sx * scale) + bias */
static inline void finish(const int32_t *acc, const int32_t *corr, float sx, const float *scale,
                          const float *bias, float *y, int64_t n_out, int64_t c0) {
    for (int v = 0; v < PANEL / VLEN; v++) {
        int64_t c = c0 + v * VLEN;
        if (c >= n_out)
            break;
        vi a = *(const vi *)(acc + v * VLEN);
        if (corr)   /* padded to whole panels; unsigned: vpdpbusd's sum may have wrapped */
            a = (vi)((vu)a - *(const vu *)(corr + c));
        vf r = __builtin_convertvector(a, vf) * (sx * load_cols(scale, n_out, c));
        if (bias)
            r = r + load_cols(bias, n_out, c);
        store_cols(y, n_out, c, r);
    }
}

typedef struct {
    const void *xq;         /* [M][Kp]: int16 (A16), or uint8 (+ 128 on the VNNI path) */
    const void *xg;         /* VNNI paths: [Kp / 4][M] groups of 4 k of xq, the rows of a
                             * group adjacent (4 bytes each for int8, 8 for int16) */
    const float *sx;        /* [M] */
    int64_t M, Kp, n_out;
    const int8_t *wp;       /* [n_panels][Kp / 4][16][4] */
    const int32_t *corr;    /* [n_panels * 16]: 128 x column sums (VNNI path) */
    const float *scale, *bias;
    float *y;
} job_t;

static inline void finish_tile(const job_t *j, const int32_t *acc, int rows, int np, int64_t m0,
                               int64_t col0, int stride, int vnni) {
    for (int m = 0; m < rows; m++)
        for (int p = 0; p < np; p++)
            finish(acc + (m * stride + p) * PANEL, vnni ? j->corr : NULL, j->sx[m0 + m],
                   j->scale, j->bias, j->y + (m0 + m) * j->n_out, j->n_out, col0 + p * PANEL);
}

/* The row tiles of n one-panel tiles from panels (columns from col0), in a group
 * function (j, panels, col0, n in scope): full tiles of R rows call tile with R, a
 * constant, so its loops unroll; the last partial tile with its row count. */
#define FOR_TILES(R, tile)                                                              \
    for (int p = 0; p < n; p++)                                                         \
        for (int64_t m0 = 0; m0 < j->M; m0 += (R)) {                                    \
            const int rows_ = j->M - m0 < (R) ? (int)(j->M - m0) : (R);                 \
            const int8_t *panel_ = panels + p * j->Kp * PANEL;                          \
            if (rows_ == (R))                                                           \
                tile(j, panel_, m0, col0 + p * PANEL, (R));                             \
            else                                                                        \
                tile(j, panel_, m0, col0 + p * PANEL, rows_);                           \
        }

#if defined(NBP_ISA_AVX512)
/* rows x np panels of int32 sums on VNNI; inlined with constant trip counts */
static inline __attribute__((always_inline, target("avx512vnni"))) void tile_vnni(
        const job_t *j, const int8_t *panels, int64_t m0, int64_t col0, const int rows,
        const int np) {
    const int64_t Kp = j->Kp, panel_bytes = Kp * PANEL;
    const int32_t *xg = (const int32_t *)j->xg + m0;
    __m512i acc[VNNI_ROWS][VNNI_PANELS];
    for (int m = 0; m < VNNI_ROWS; m++)
        for (int p = 0; p < VNNI_PANELS; p++)
            acc[m][p] = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kp; k += 4) {
        __m512i w[VNNI_PANELS] = {0};   /* only the first np are used */
        for (int p = 0; p < VNNI_PANELS; p++) {
            if (p < np) {
                const int8_t *q = panels + p * panel_bytes + k * PANEL;
                __builtin_prefetch(q + PREFETCH);
                w[p] = _mm512_loadu_si512(q);
            }
        }
        for (int m = 0; m < VNNI_ROWS; m++) {
            if (m < rows) {
                const __m512i xb = _mm512_set1_epi32(xg[m]);
                for (int p = 0; p < VNNI_PANELS; p++)
                    if (p < np)
                        acc[m][p] = _mm512_dpbusd_epi32(acc[m][p], xb, w[p]);
            }
        }
        xg += j->M;
    }
    int32_t out[VNNI_ROWS * VNNI_PANELS * PANEL] __attribute__((aligned(64)));
    for (int m = 0; m < rows; m++)
        for (int p = 0; p < np; p++)
            _mm512_store_si512(out + (m * VNNI_PANELS + p) * PANEL, acc[m][p]);
    finish_tile(j, out, rows, np, m0, col0, VNNI_PANELS, 1);
}

static __attribute__((noinline, target("avx512vnni"))) void group_vnni(
        const job_t *j, const int8_t *panels, int64_t col0, int n) {
    for (int p0 = 0; p0 < n; p0 += VNNI_PANELS) {
        int np = n - p0 < VNNI_PANELS ? n - p0 : VNNI_PANELS;
        const int8_t *p = panels + p0 * j->Kp * PANEL;
        for (int64_t m0 = 0; m0 < j->M; m0 += VNNI_ROWS) {
            int rows = j->M - m0 < VNNI_ROWS ? (int)(j->M - m0) : VNNI_ROWS;
            if (rows == VNNI_ROWS && np == VNNI_PANELS)
                tile_vnni(j, p, m0, col0 + p0 * PANEL, VNNI_ROWS, VNNI_PANELS);
            else
                tile_vnni(j, p, m0, col0 + p0 * PANEL, rows, np);
        }
    }
}
/* rows x 1 panel of int32 sums of 16-bit x and the widened weight on VNNI. Each 64-byte
 * weight vector (16 columns x k 0-3) is widened to int16 and its dwords split into wa
 * (every column's k 0-1) and wb (k 2-3), so one vpdpwssd per row and pair takes the row's
 * pair as a 32-bit broadcast: one accumulator a row, 16 rows a tile. The
 * tiles before it (8 rows of two accumulators, lane parity = k pair, a 64-bit broadcast
 * per row, both widened weights re-made per row tile) made the 16-row K600 head 1.67x
 * and a 16-row step's linears 1.52x slower on a Zen 5 (cpu_kernel_ab, int8_linear). */
static inline __attribute__((always_inline, target("avx512vnni"))) void tile_vnni16(
        const job_t *j, const int8_t *panel, int64_t m0, int64_t col0, const int rows) {
    const int64_t Kp = j->Kp;
    const int32_t *xg = (const int32_t *)j->xg + 2 * m0;   /* [Kp / 4][M][2] int16 pairs */
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    __m512i acc[A16_ROWS];
    for (int m = 0; m < A16_ROWS; m++)
        acc[m] = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kp; k += 4) {
        const int8_t *q = panel + k * PANEL;
        __builtin_prefetch(q + PREFETCH);
        const __m512i z0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)q));
        const __m512i z1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + 32)));
        const __m512i wa = _mm512_permutex2var_epi32(z0, even, z1);
        const __m512i wb = _mm512_permutex2var_epi32(z0, odd, z1);
        for (int m = 0; m < A16_ROWS; m++) {
            if (m < rows) {
                acc[m] = _mm512_dpwssd_epi32(acc[m], wa, _mm512_set1_epi32(xg[2 * m]));
                acc[m] = _mm512_dpwssd_epi32(acc[m], wb, _mm512_set1_epi32(xg[2 * m + 1]));
            }
        }
        xg += 2 * j->M;
    }
    int32_t out[A16_ROWS * PANEL] __attribute__((aligned(64)));
    for (int m = 0; m < rows; m++)
        _mm512_store_si512(out + m * PANEL, acc[m]);
    finish_tile(j, out, rows, 1, m0, col0, 1, 0);
}

static __attribute__((noinline, target("avx512vnni"))) void group_vnni16(
        const job_t *j, const int8_t *panels, int64_t col0, int n) {
    FOR_TILES(A16_ROWS, tile_vnni16)
}
#endif

#if defined(X86)
/* rows x 2 ymm accumulators (columns 0-7, 8-15) -> out[m][0 .. 15] */
static inline __attribute__((always_inline)) void store_halves(int32_t *out, __m256i acc[][2],
                                                               int rows) {
    for (int m = 0; m < rows; m++) {
        _mm256_store_si256((__m256i *)(out + m * PANEL), acc[m][0]);
        _mm256_store_si256((__m256i *)(out + m * PANEL + 8), acc[m][1]);
    }
}

/* Half h (8 columns) of a panel's 64-byte int8 weight vector q, widened to int16 in two
 * ymm of 4 columns each, their dwords split by vshufps into *wa, every column's k 0-1,
 * and *wb, k 2-3, so a row's int16 pairs go in as 32-bit broadcasts. vshufps works inside 128-bit lanes: the columns come in the order
 * 0 1 4 5 2 3 6 7, which store_split undoes. */
static inline __attribute__((always_inline)) void split_pairs(const int8_t *q, int h,
                                                              __m256i *wa, __m256i *wb) {
    const __m256 z0 = _mm256_castsi256_ps(
        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 32 * h))));
    const __m256 z1 = _mm256_castsi256_ps(
        _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 32 * h + 16))));
    *wa = _mm256_castps_si256(_mm256_shuffle_ps(z0, z1, 0x88));
    *wb = _mm256_castps_si256(_mm256_shuffle_ps(z0, z1, 0xdd));
}

/* rows x 2 accumulators of split_pairs' column order -> out[m][0 .. 15] in order */
static inline __attribute__((always_inline)) void store_split(int32_t *out, __m256i acc[][2],
                                                              int rows) {
    for (int m = 0; m < rows; m++)   /* 64-bit lanes (0 1)(4 5)(2 3)(6 7) -> 0 .. 7 */
        for (int h = 0; h < 2; h++)
            _mm256_store_si256((__m256i *)(out + m * PANEL + 8 * h),
                               _mm256_permute4x64_epi64(acc[m][h], 0xd8));
}
#endif

#if defined(NBP_ISA_AVX2)
/* AVX-VNNI (Alder Lake and later Intel cores, Zen 5): vpdpbusd on ymm, one instruction
 * where AVX2 takes three, for int8 rows. A ymm holds 8 of a panel's 16 columns, so a row
 * has two accumulators. */

/* rows x 1 panel of int32 sums of u8 (xq + 128) x and the int8 weight, vpdpbusd */
static inline __attribute__((always_inline, target("avxvnni"))) void tile_avx_vnni(
        const job_t *j, const int8_t *panel, int64_t m0, int64_t col0, const int rows) {
    const int64_t Kp = j->Kp;
    const int32_t *xg = (const int32_t *)j->xg + m0;
    __m256i acc[AVX_VNNI_ROWS][2];
    for (int m = 0; m < AVX_VNNI_ROWS; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < Kp; k += 4) {
        const int8_t *q = panel + k * PANEL;
        __builtin_prefetch(q + PREFETCH);
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)q);
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 32));
        for (int m = 0; m < AVX_VNNI_ROWS; m++) {
            if (m < rows) {
                const __m256i xb = _mm256_set1_epi32(xg[m]);
                acc[m][0] = _mm256_dpbusd_avx_epi32(acc[m][0], xb, w0);
                acc[m][1] = _mm256_dpbusd_avx_epi32(acc[m][1], xb, w1);
            }
        }
        xg += j->M;
    }
    int32_t out[AVX_VNNI_ROWS * PANEL] __attribute__((aligned(32)));
    store_halves(out, acc, rows);
    finish_tile(j, out, rows, 1, m0, col0, 1, 1);
}

static __attribute__((noinline, target("avxvnni"))) void group_avx_vnni(
        const job_t *j, const int8_t *panels, int64_t col0, int n) {
    FOR_TILES(AVX_VNNI_ROWS, tile_avx_vnni)
}
#endif

#if defined(X86)
/* rows x 1 panel of int32 sums with AVX2 (the sign trick) */
static inline __attribute__((always_inline)) void tile_port(
        const job_t *j, const int8_t *panel, int64_t m0, int64_t col0, const int rows) {
    const int64_t Kp = j->Kp;
    const uint8_t *x = (const uint8_t *)j->xq + m0 * Kp;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[PORT_ROWS][2];
    for (int m = 0; m < PORT_ROWS; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < Kp; k += 4) {
        const int8_t *q = panel + k * PANEL;
        __builtin_prefetch(q + PREFETCH);
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)q);
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q + 32));
        for (int m = 0; m < PORT_ROWS; m++) {
            if (m < rows) {
                int32_t x4;
                memcpy(&x4, x + m * Kp + k, 4);
                const __m256i xb = _mm256_set1_epi32(x4), ax = _mm256_abs_epi8(xb);
                acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w0, xb)), ones));
                acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w1, xb)), ones));
            }
        }
    }
    int32_t out[PORT_ROWS * PANEL] __attribute__((aligned(32)));
    store_halves(out, acc, rows);
    finish_tile(j, out, rows, 1, m0, col0, 1, 0);
}
#else
/* rows x 1 panel of int32 sums in plain C, of int8 x or (a16) 16-bit x */
static inline void tile_plain(const job_t *j, const int8_t *panel, int64_t m0, int64_t col0,
                              const int rows, const int a16) {
    const int64_t Kp = j->Kp;
    int32_t out[(PORT_ROWS > PORT16_ROWS ? PORT_ROWS : PORT16_ROWS) * PANEL] = {0};
    for (int m = 0; m < rows; m++) {
        const int8_t *x8 = (const int8_t *)j->xq + (m0 + m) * Kp;
        const int16_t *x16 = (const int16_t *)j->xq + (m0 + m) * Kp;
        int32_t *a = out + m * PANEL;
        for (int64_t k = 0; k < Kp; k += 4)
            for (int c = 0; c < PANEL; c++)
                for (int t = 0; t < 4; t++)
                    a[c] += (a16 ? (int32_t)x16[k + t] : (int32_t)x8[k + t])
                            * (int32_t)panel[k * PANEL + c * 4 + t];
    }
    finish_tile(j, out, rows, 1, m0, col0, 1, 0);
}

static inline void tile_port(const job_t *j, const int8_t *panel, int64_t m0, int64_t col0,
                             const int rows) {
    tile_plain(j, panel, m0, col0, rows, 0);
}
#endif

#if defined(X86)
/* rows x 1 panel of int32 sums of 16-bit x with AVX2 vpmaddwd on split_pairs' halves, two
 * accumulators a row, 4-row tiles: a 16-row K600 step's linears 1.5x faster (cold, a Zen
 * 5 forced to AVX2) than 2-row tiles of four accumulators re-widening the weights for
 * every row pair (AVX-VNNI's vpdpwssd on the same split was no faster) */
static inline __attribute__((always_inline)) void tile_port16(
        const job_t *j, const int8_t *panel, int64_t m0, int64_t col0, const int rows) {
    const int64_t Kp = j->Kp;
    const int16_t *x = (const int16_t *)j->xq + m0 * Kp;
    __m256i acc[PORT16_ROWS][2];
    for (int m = 0; m < PORT16_ROWS; m++)
        acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < Kp; k += 4) {
        const int8_t *q = panel + k * PANEL;
        __builtin_prefetch(q + PREFETCH);
        for (int h = 0; h < 2; h++) {
            __m256i wa, wb;
            split_pairs(q, h, &wa, &wb);
            for (int m = 0; m < PORT16_ROWS; m++) {
                if (m < rows) {
                    int32_t p01, p23;
                    memcpy(&p01, x + m * Kp + k, 4);
                    memcpy(&p23, x + m * Kp + k + 2, 4);
                    acc[m][h] = _mm256_add_epi32(acc[m][h], _mm256_add_epi32(
                        _mm256_madd_epi16(wa, _mm256_set1_epi32(p01)),
                        _mm256_madd_epi16(wb, _mm256_set1_epi32(p23))));
                }
            }
        }
    }
    int32_t out[PORT16_ROWS * PANEL] __attribute__((aligned(32)));
    store_split(out, acc, rows);
    finish_tile(j, out, rows, 1, m0, col0, 1, 0);
}

/* One row (an NTP step) of int32 sums of 16-bit x with AVX2, the weights as widened:
 * acc[h] lane i holds column 4 h + i / 2, k pair i % 2 of each group of 4, the halves
 * added at the end. Splitting the weights into k pairs (tile_port16) costs four shuffles
 * per group that only one row shares: a one-row K600 step's linears took 1.26x as long
 * that way (cold, a Zen 5 forced to AVX2). */
static inline __attribute__((always_inline)) void tile_port16_row(
        const job_t *j, const int8_t *panel, int64_t m0, int64_t col0, const int rows) {
    const int16_t *x = (const int16_t *)j->xq + m0 * j->Kp;
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                      _mm256_setzero_si256()};
    for (int64_t k = 0; k < j->Kp; k += 4) {
        const int8_t *q = panel + k * PANEL;
        __builtin_prefetch(q + PREFETCH);
        int64_t x4;
        memcpy(&x4, x + k, 8);
        const __m256i xb = _mm256_set1_epi64x(x4);
        for (int h = 0; h < 4; h++) {
            const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16 * h)));
            acc[h] = _mm256_add_epi32(acc[h], _mm256_madd_epi16(xb, w));
        }
    }
    int32_t out[PANEL] __attribute__((aligned(32)));
    for (int h = 0; h < 4; h += 2)   /* hadd pairs lanes; the permute restores column order */
        _mm256_store_si256((__m256i *)(out + 4 * h), _mm256_permute4x64_epi64(
            _mm256_hadd_epi32(acc[h], acc[h + 1]), 0xd8));
    finish_tile(j, out, rows, 1, m0, col0, 1, 0);
}
#else
static inline void tile_port16(const job_t *j, const int8_t *panel, int64_t m0, int64_t col0,
                               const int rows) {
    tile_plain(j, panel, m0, col0, rows, 1);
}
#define tile_port16_row tile_port16
#endif

/* the portable tiles (int8 or, a16, 16-bit x) of n panels from col0 */
static void group_port(const job_t *j, const int8_t *panels, int64_t col0, int n, int a16) {
    if (a16 && j->M == 1) {
        FOR_TILES(1, tile_port16_row)
    } else if (a16) {
        FOR_TILES(PORT16_ROWS, tile_port16)
    } else {
        FOR_TILES(PORT_ROWS, tile_port)
    }
}

/* Row m of x (after its LayerNorm into xn + m K, with norm) quantized into xq (rows Kp
 * bytes apart, 2 Kp for int16); returns its sx. */
static float prepare_row(const float *x, int64_t m, int64_t K, int64_t Kp, int norm,
                         const float *gamma, const float *beta, float eps, float *xn,
                         uint8_t *xq, float levels, int a16, int vnni) {
    const float *xr = x + m * K;
    if (norm) {
        layer_norm_rows(xr, 1, K, gamma, beta, eps, xn + m * K);
        xr = xn + m * K;
    }
    return quantize_row(xr, K, Kp, xq + m * Kp * (a16 ? 2 : 1), levels, a16,
                        vnni && !a16 ? 128 : 0);
}

/* Group g (4 k) of every quantized row, copied for the VNNI tiles: xg[g][m] (4 bytes, 8
 * for int16). Split across the threads by groups, writing xg in order, not row by row:
 * a row's groups are 4 M bytes apart, which for a 512-row prefill (2 KiB) put all of a
 * row's writes in two sets of L1, and a decode step's 16 rows share each group's cache
 * line, which two threads writing half of the rows each passed back and forth (that copy
 * was ~60% of the rows' preparation in a 16-row step's linears on a Zen 4). The prefill's
 * layer products ran 1.10-1.17x faster (cpu_kernel_ab_*_group_copy*.json). Constant
 * sizes: a memcpy of a variable size was a libc call per group (25 us of a 16 x 1536
 * call). */
static void copy_group(const uint8_t *xq, int64_t M, int64_t Kp, int64_t g, uint8_t *xg,
                       int a16) {
    for (int64_t m = 0; a16 && m < M; m++)
        memcpy(xg + (g * M + m) * 8, xq + m * Kp * 2 + g * 8, 8);
    for (int64_t m = 0; !a16 && m < M; m++)
        memcpy(xg + (g * M + m) * 4, xq + m * Kp + g * 4, 4);
}

/* x: [M][K] row-major fp32; wp: [ceil(n_out / 16)][Kp / 4][16][4] int8, Kp = K
 * rounded up to a multiple of 4; corr: [ceil(n_out / 16) * 16] int32, 128 x
 * the column sums of the weight; scale: [n_out] fp32; bias: [n_out] or NULL;
 * y: [M][n_out] fp32. mode: MODE_VNNI for the VNNI path (else the portable one),
 * | MODE_A16 for 16-bit activations (else int8);
 * act: 0 none, 1 exact GELU on y; norm: 1 to quantize the LayerNorm of each row
 * of x (gamma, beta [K] or NULL for 1 / 0; eps), 0 for x as is; residual:
 * [M][n_out] fp32 added last, or NULL. Returns 0; -1 if VNNI is asked for where
 * it does not run, -2 if out of memory, -3 for an unknown act or mode (nothing
 * written). */
int nbp_int8_linear(const float *x, int64_t M, int64_t K, const int8_t *wp, const int32_t *corr,
                    const float *scale, const float *bias, float *y, int64_t n_out, int mode,
                    int act, int norm, const float *gamma, const float *beta, float eps,
                    const float *residual) {
    if ((act != ACT_NONE && act != ACT_GELU) || (mode & ~(MODE_VNNI | MODE_A16)))
        return -3;
    const int a16 = (mode & MODE_A16) != 0;
    int vnni = mode & MODE_VNNI;
    if (vnni && !nbp_int8_vnni())
        return -1;
#if defined(NBP_ISA_AVX2)
    /* AVX-VNNI for int8 rows, more than one: a row streams the weights either way (AVX2's
     * tiles were 3-5% faster cold there), and for int16 rows vpdpwssd tiles were no faster
     * than tile_port16's vpmaddwd + vpaddd (0.96-0.98x at 16 rows on a Zen 5; the same
     * integers) */
    if (M == 1 || a16)
        vnni = 0;
#endif
    const int64_t Kp = (K + 3) / 4 * 4, row_bytes = Kp * (a16 ? 2 : 1);
    uint8_t *xq = malloc((size_t)(M * row_bytes) + (size_t)M * sizeof(float)
                         + (norm ? (size_t)(M * K) * sizeof(float) : 0));
    /* The VNNI tiles' rows as groups (job_t.xg): read from one pointer at constant
     * offsets, where 16 rows Kp apart took 16 row registers, spilled to the stack and
     * to vector registers (the 16-row int8 head 1.23x faster on a Zen 4, cpu_kernel_ab;
     * quantizing straight into the groups made a 16-row step ~5% slower: its loop no
     * longer vectorised, where this copy moves M row_bytes). */
    uint8_t *xg = vnni ? malloc((size_t)(M * row_bytes)) : NULL;
    if (!xq || (vnni && !xg)) {
        free(xq);
        free(xg);
        return -2;
    }
    float *sx = (float *)(xq + M * row_bytes);   /* M * row_bytes is a multiple of 4 */
    const float levels = a16 ? a16_levels(K) : 127.0f;
    const job_t j = {xq, xg, sx, M, Kp, n_out, wp, corr, scale, bias, y};
    const int64_t n_panels = (n_out + PANEL - 1) / PANEL;
    /* One region: the rows are prepared across the threads, then the panels. A decode
     * step's 16 rows, prepared by one thread before the region while the other waited,
     * took 9-14 us of a 16 x 384 or 16 x 1536 call with one panel (Zen 4) */
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            sx[m] = prepare_row(x, m, K, Kp, norm, gamma, beta, eps, sx + M, xq, levels, a16,
                                vnni);
        if (xg) {
            #pragma omp for schedule(static)
            for (int64_t g = 0; g < Kp / 4; g++)
                copy_group(xq, M, Kp, g, xg, a16);
        }
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < n_panels; p += GROUP) {
            int n = n_panels - p < GROUP ? (int)(n_panels - p) : GROUP;
            const int8_t *panels = wp + p * Kp * PANEL;
#if defined(NBP_ISA_AVX512)
            if (vnni && a16)
                group_vnni16(&j, panels, p * PANEL, n);
            else if (vnni)
                group_vnni(&j, panels, p * PANEL, n);
            else
#elif defined(NBP_ISA_AVX2)
            if (vnni)
                group_avx_vnni(&j, panels, p * PANEL, n);
            else
#endif
                group_port(&j, panels, p * PANEL, n, a16);
            if (act != ACT_NONE || residual)   /* the group's outputs, while they are in L1 */
                epilogue_cols(y, residual, M, n_out, p * PANEL, n * PANEL, act);
        }
    }
    free(xg);
    free(xq);
    return 0;
}
