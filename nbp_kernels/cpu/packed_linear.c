/* packed_linear: y = x @ W^T for few rows of x (fp32 activations, CPU), W pre-packed
 * and stored as fp32, bf16, or int8 with one fp32 scale per output column.
 *
 * Decode steps feed 1..~32 rows through every linear, and read every weight
 * once per step: the step is bound by memory, so the weight is packed once into
 * panels of 16 output columns, wp[panel][k][16] (contiguous), streamed from
 * memory once per call against register tiles of several rows of x (further
 * row tiles find the panels in L1/L2). Narrower weights read fewer bytes;
 * they are widened to fp32 in registers (bf16: a shift; int8: a sign
 * extension and a convert, the column scale applied once at the end). A
 * software prefetch 4 KiB ahead keeps each stream going while the FMAs run
 * (the hardware prefetcher alone left bandwidth unused).
 *
 * One portable source: GCC vector extensions at the register width; a 16-float
 * panel row is one zmm (AVX-512), two ymm (AVX2) or four q registers (NEON).
 * cpu_build.py compiles it once per ISA with -DNBP_ISA_<isa>; the tile sizes
 * differ (accumulators + weights fit the register file), and the int8 widening
 * uses the ISA's one-instruction sign extension where there is one.
 *
 * Optional exact GELU on the outputs (the MLP's fc1), an optional residual added
 * to them (attention's proj, the MLP's fc2) and an optional LayerNorm of the input
 * rows (ln1 before q/k/v, ln2 before fc1, ln_f before the head): a decode step then
 * has no separate torch pass over a cold tensor between two kernels, and no gap in
 * which the OpenMP workers fall asleep.
 *
 * Threads: OpenMP over panel groups, in torch's libgomp (already loaded when
 * this library is opened), so torch.set_num_threads applies and no second
 * thread pool competes for cores.
 *
 * nbp_kernels/packed_linear.py has the Python contract, nbp_kernels/reference.py
 * the semantics.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "isa.h"   /* VLEN (floats per vector register), nbp_cpu_isa */

#if defined(NBP_ISA_AVX512)
#  define TILE_ROWS 8     /* 8 rows x 3 panels = 24 of the 32 zmm as accumulators */
#  define TILE_PANELS 3
#  define GROUP 3         /* panels per thread work item (one row streams them one by one) */
#  define PACK_ROWS 1     /* several rows of a large product read x transposed (pack_rows) */
#elif defined(NBP_ISA_AVX2)
#  define TILE_ROWS 6     /* 6 rows x 1 panel = 12 of the 16 ymm as accumulators */
#  define TILE_PANELS 1
#  define GROUP 2
#  define PACK_ROWS 1     /* as on AVX-512: the 16-row float32 head 1.02-1.07x on a Zen 4 */
#  define K_UNROLL 2      /* k steps a loop iteration (tile) */
#else
#  define TILE_ROWS 6     /* 6 rows x 1 panel = 24 of the 32 q registers as accumulators */
#  define TILE_PANELS 1
#  define GROUP 2
#endif

#ifndef PACK_ROWS
#  define PACK_ROWS 0     /* NEON tiles of 6 rows keep their row pointers in registers */
#endif
#ifndef K_UNROLL
#  define K_UNROLL 1
#endif
/* panels one row streams at once (a tile of one row and ROW_STREAMS panels). On x86 one
 * stream a core: on a Zen 4 that ran a one-row K600 step 1.10-1.15x (float32) and
 * 1.39-1.54x (int8 weights) faster than a group's 2 or 3 panels at once, in both builds
 * (cpu_kernel_ab_*_AMD-EPYC-f25m17-2c_row_streams.json) */
#if defined(X86)
#  define ROW_STREAMS 1
#else
#  define ROW_STREAMS GROUP
#endif
/* weights (n_out x K) from which a product of several rows is worth transposing x for:
 * the K600 vocabulary head (64000 x 384), not its 384-wide layers (packing 16 x 384
 * floats cost more than it saved there) */
#define PACK_MIN_WEIGHTS (1 << 22)

#define PANEL 16            /* output columns per panel */
#define PREFETCH 4096       /* bytes ahead in each weight stream */

/* packed_linear.py's codes: float32 activations times fp32, bf16 or int8 weights
 * (wp[panel][k][16]); bf16 activations times bf16 weights in k pairs, by FMAs or by
 * AVX512-BF16 dot products (wp[panel][k / 2][16][2], below) */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_BF16_PAIRS = 3, W_BF16_PAIRS_DOT = 4 };

#define SUB (PANEL / VLEN)  /* vector registers per panel row */

/* Native-width vectors: wider generic vectors were split through the stack. */
typedef float vf __attribute__((vector_size(VLEN * 4), aligned(4)));
typedef uint16_t vbf __attribute__((vector_size(VLEN * 2), aligned(2)));
typedef int8_t vq __attribute__((vector_size(VLEN), aligned(1)));
typedef int16_t vh __attribute__((vector_size(VLEN * 2)));
typedef int32_t vi __attribute__((vector_size(VLEN * 4)));
typedef uint32_t vu __attribute__((vector_size(VLEN * 4)));

static inline int64_t elem_bytes(const int dtype) {
    return dtype == W_F32 ? 4 : dtype == W_BF16 ? 2 : 1;
}

/* VLEN int8 at p sign-extended to int32: one instruction where the ISA has it
 * (GCC's generic int8 -> int32 conversion took several, or went lane by lane) */
static inline __attribute__((always_inline)) vi widen_i8(const char *p) {
#if defined(NBP_ISA_AVX512)
    return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(NBP_ISA_AVX2)
    return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    return __builtin_convertvector(__builtin_convertvector(*(const vq *)p, vh), vi);
#endif
}

/* VLEN uint16 at p zero-extended to uint32 (GCC split the generic conversion into
 * half-register pieces on AVX-512) */
static inline __attribute__((always_inline)) vu widen_u16(const char *p) {
#if defined(NBP_ISA_AVX512)
    return (vu)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
#elif defined(NBP_ISA_AVX2)
    return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
#else
    return __builtin_convertvector(*(const vbf *)p, vu);
#endif
}

/* VLEN weights at p, widened to fp32 (bf16 is the top half of an fp32) */
static inline __attribute__((always_inline)) vf load_w(const char *p, const int dtype) {
    if (dtype == W_F32)
        return *(const vf *)p;
    if (dtype == W_BF16)
        return (vf)(widen_u16(p) << 16);
    return __builtin_convertvector(widen_i8(p), vf);
}

#include "panel_cols.h"

/* One k of a tile (below): acc[m][j] += x[m][k] w[k][j] for its rows and panels. Each
 * panel's row streams with a software prefetch PREFETCH bytes ahead where the tile is
 * the product's only row tile (ahead NULL); several row tiles read panels the previous
 * group's tiles brought to L2 (`ahead`, which pf_ahead issues: every k, or every other
 * k where its step is at most half a cache line, as row_tiles' is with AVX2's groups). */
static inline __attribute__((always_inline)) void k_step(
        vf acc[TILE_ROWS][GROUP * SUB], const float *x, int64_t K, int64_t k,
        const char *panels, const int dtype, const int rows, const int n_panels,
        const char *ahead, const int64_t ahead_step, const int64_t ahead_stride, const int xt,
        const int pf_ahead) {
    const int64_t row_bytes = PANEL * elem_bytes(dtype);
    if (ahead && pf_ahead) {   /* the next group's panels, into L2, at the rate this group reads */
        for (int j = 0; j < GROUP; j++)
            __builtin_prefetch(ahead + j * ahead_stride + k * ahead_step, 0, 2);
    }
    vf w[GROUP * SUB] = {0};   /* only the first n_panels * SUB are used */
    for (int j = 0; j < GROUP; j++) {
        if (j < n_panels) {
            const char *p = panels + (j * K + k) * row_bytes;
            if (!ahead)
                __builtin_prefetch(p + PREFETCH);
            for (int v = 0; v < SUB; v++)
                w[j * SUB + v] = load_w(p + v * VLEN * elem_bytes(dtype), dtype);
        }
    }
    for (int m = 0; m < TILE_ROWS; m++) {
        if (m < rows) {
            /* x - 0 is x for every x (0 + x is not, for -0), so this compiles to a
             * broadcast load: 0 + x cost an add and a shuffle on the FMA ports */
            vf xv = (xt ? x[k * TILE_ROWS + m] : x[m * K + k]) - (vf){0};
            for (int j = 0; j < GROUP * SUB; j++)
                if (j < n_panels * SUB)
                    acc[m][j] += xv * w[j];
        }
    }
}

/* rows (<= TILE_ROWS) rows of x times n_panels (<= GROUP) consecutive panels [K][16]
 * -> y[rows][col0 : col0 + 16 n_panels] = acc * scale + bias. x: [rows][K], or with
 * xt, this row tile transposed, [K][TILE_ROWS] (pack_rows): the tile's broadcasts then
 * take one pointer and constant offsets (AVX-512's eight row pointers did not fit the
 * registers left, and moving them back from vector registers took issue slots of an
 * FMA port). Inlined so the common tiles compile with constant trip counts.
 * AVX2 steps two k an iteration, the `ahead` prefetch at the first: its 6-row tile issues
 * 12 FMAs a k from 16 registers, and the loop's counters, the ahead test and redundant
 * prefetches took a third of its instructions (with the 4 KiB prefetch kept to one-tile
 * products: the 16-row float32 head 1.09x and step 1.10x faster on a Zen 4, where a busy
 * host slowed AVX2's head more than AVX-512's; AVX-512 itself no faster). */
static inline __attribute__((always_inline)) void tile(
        const float *x, int64_t K, const char *panels, const int dtype, const float *scale,
        const float *bias, float *y, int64_t n_out, int64_t col0, const int rows,
        const int n_panels, const char *ahead, const int64_t ahead_step,
        const int64_t ahead_stride, const int xt) {
    /* Unscaled weights start from the bias (the float32 results of the earlier
     * AVX-512-only kernel, bit for bit); int8 sums are scaled before the bias. */
    vf acc[TILE_ROWS][GROUP * SUB];
    for (int j = 0; j < GROUP * SUB; j++) {
        vf b = bias && !scale && j < n_panels * SUB ? load_cols(bias, n_out, col0 + j * VLEN)
                                                    : (vf){0};
        for (int m = 0; m < TILE_ROWS; m++)
            acc[m][j] = b;
    }
#define K_STEP(k, pf_ahead) k_step(acc, x, K, k, panels, dtype, rows, n_panels, ahead, \
                                   ahead_step, ahead_stride, xt, pf_ahead)
    int64_t k = 0;
    if (K_UNROLL == 2 && ahead_step <= 32) {
        for (; k + 1 < K; k += 2) {
            K_STEP(k, 1);
            K_STEP(k + 1, 0);
        }
    }
    for (; k < K; k++)
        K_STEP(k, 1);
#undef K_STEP
    for (int j = 0; j < n_panels * SUB; j++) {
        int64_t c = col0 + j * VLEN;
        if (scale) {
            vf s = load_cols(scale, n_out, c), b = bias ? load_cols(bias, n_out, c) : (vf){0};
            for (int m = 0; m < rows; m++)
                acc[m][j] = acc[m][j] * s + b;
        }
        for (int m = 0; m < rows; m++)
            store_cols(y + m * n_out, n_out, c, acc[m][j]);
    }
}

/* One group of n (<= GROUP) panels against M > 1 rows of x, in row tiles; x: [M][K], or
 * with xt, packed by pack_rows (row tile m0 / TILE_ROWS at x + m0 K).
 *
 * Rows beyond one tile: the first row tile reads the group's panels from memory, the
 * others find them in L1/L2, and memory idled while those computed. So every tile also
 * prefetches the next group's panels into L2 (`ahead`), spread evenly over all the
 * group's tiles: the stream never pauses, and the first tile of the next group reads
 * from L2. Each of the next group's panels is its own prefetch stream (one sweep
 * over the group's bytes was 15% slower on the 16-row float32 head: fewer requests
 * in flight per core). */
static inline __attribute__((always_inline)) void row_tiles(
        const float *x, int64_t M, int64_t K, const char *panels, const int dtype,
        const float *scale, const float *bias, float *y, int64_t n_out, int64_t col0, int n,
        const int xt) {
    const int64_t panel_bytes = K * PANEL * elem_bytes(dtype);
    const int64_t n_tiles = (M + TILE_ROWS - 1) / TILE_ROWS;
    /* bytes of each of the next group's panels per k step, over every tile's K steps */
    const int64_t passes = (n + TILE_PANELS - 1) / TILE_PANELS * n_tiles;
    const int64_t step = n_tiles > 1 ? (panel_bytes + passes * K - 1) / (passes * K) : 0;
    const char *ahead = n_tiles > 1 ? panels + n * panel_bytes : NULL;
    for (int j0 = 0; j0 < n; j0 += TILE_PANELS) {
        int np = n - j0 < TILE_PANELS ? n - j0 : TILE_PANELS;
        const char *p = panels + j0 * panel_bytes;
        int64_t c = col0 + j0 * PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
            int rows = M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS;
#define TILE_OF(R) tile(x + m0 * K, K, p, dtype, scale, bias, y + m0 * n_out, n_out, c, R, \
                        TILE_PANELS, ahead, step, panel_bytes, xt)
            if (np == TILE_PANELS) {
                /* a constant row count per case: the generic tile tests every row in its
                 * inner loop, and 16 rows on AVX2 leave a 4-row last tile */
                switch (rows) {
                case TILE_ROWS: TILE_OF(TILE_ROWS); break;
                case 4: TILE_OF(4); break;
                case 2: TILE_OF(2); break;
                default: tile(x + m0 * K, K, p, dtype, scale, bias, y + m0 * n_out, n_out, c,
                              rows, np, ahead, step, panel_bytes, xt);
                }
            } else {
                tile(x + m0 * K, K, p, dtype, scale, bias, y + m0 * n_out, n_out, c, rows, np,
                     ahead, step, panel_bytes, xt);
            }
#undef TILE_OF
            if (ahead)
                ahead += K * step;
        }
    }
}

/* One group of n (<= GROUP) panels against every row of x (packed: x as pack_rows
 * wrote it, for more than one row) */
static inline __attribute__((always_inline)) void group(
        const float *x, int64_t M, int64_t K, const char *panels, const int dtype,
        const float *scale, const float *bias, float *y, int64_t n_out, int64_t col0, int n,
        int packed) {
    if (M == 1) {   /* one row (an NTP step): ROW_STREAMS of the group's panels at a time */
        const int64_t panel_bytes = K * PANEL * elem_bytes(dtype);
        for (int j = 0; j < n; j += ROW_STREAMS) {
            const char *p = panels + j * panel_bytes;
            if (n - j >= ROW_STREAMS)
                tile(x, K, p, dtype, scale, bias, y, n_out, col0 + j * PANEL, 1, ROW_STREAMS,
                     NULL, 0, 0, 0);
            else
                tile(x, K, p, dtype, scale, bias, y, n_out, col0 + j * PANEL, 1, n - j, NULL,
                     0, 0, 0);
        }
        return;
    }
    if (packed)
        row_tiles(x, M, K, panels, dtype, scale, bias, y, n_out, col0, n, 1);
    else
        row_tiles(x, M, K, panels, dtype, scale, bias, y, n_out, col0, n, 0);
}

/* x [M][K] -> xt (ceil(M / TILE_ROWS) TILE_ROWS K floats): each tile of TILE_ROWS rows
 * transposed, [K][TILE_ROWS], at xt + m0 K (a short last tile too; its lanes past M
 * are never read) */
static void pack_rows(const float *x, int64_t M, int64_t K, float *xt) {
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const int64_t rows = M - m0 < TILE_ROWS ? M - m0 : TILE_ROWS;
        float *t = xt + m0 * K;
        for (int64_t k = 0; k < K; k++)
            for (int64_t m = 0; m < rows; m++)
                t[k * TILE_ROWS + m] = x[(m0 + m) * K + k];
    }
}

/* One function per dtype, each with its own parallel loop: OpenMP outlines the
 * loop body before inlining, so only a literal dtype there removes the dtype
 * branches from the inner loop. The activation runs on each group's outputs
 * after its stores (still in L1), outside the tiles, so without one the tiles
 * compute and store exactly as before it existed. */
#define DEFINE_LINEAR(NAME, DTYPE)                                                           \
    static void NAME(const float *x, int64_t M, int64_t K, const char *wp, const float *scale, \
                     const float *bias, float *y, int64_t n_out, int act,                     \
                     const float *residual, int packed) {                                     \
        const int64_t n_panels = (n_out + PANEL - 1) / PANEL;                                 \
        const int64_t panel_bytes = K * PANEL * elem_bytes(DTYPE);                            \
        _Pragma("omp parallel for schedule(static)")                                          \
        for (int64_t p = 0; p < n_panels; p += GROUP) {                                       \
            int n = n_panels - p < GROUP ? (int)(n_panels - p) : GROUP;                       \
            group(x, M, K, wp + p * panel_bytes, DTYPE, scale, bias, y, n_out, p * PANEL, n, \
                  packed);                                                                    \
            if (act != ACT_NONE || residual)                                                  \
                epilogue_cols(y, residual, M, n_out, p * PANEL, n * PANEL, act);              \
        }                                                                                     \
    }
DEFINE_LINEAR(linear_f32, W_F32)
DEFINE_LINEAR(linear_bf16, W_BF16)
DEFINE_LINEAR(linear_i8, W_I8)

/* bf16 activations (W_BF16_PAIRS, W_BF16_PAIRS_DOT).
 *
 * A 16-row step with bf16 weights is bound by its FMAs, not by the weight stream
 * (narrower weights halve the bytes, not the FMAs). Rounding the rows of x to bf16 as well (as
 * torch's .to(torch.bfloat16): nearest even, NaN kept) lets AVX512-BF16's vdpbf16ps
 * do 32 multiply-adds an instruction, twice an FMA's: its products of two bf16 are
 * exact in float32, its sums rounded in float32 (the reference, reference.bf16_rows,
 * is exact up to that summation order). The weights are packed in k pairs,
 * wp[panel][K2 / 2][16][2] (K2 = K rounded up to even, zero-padded): each 32-bit lane
 * holds one column's weights at k (low half) and k + 1, vdpbf16ps's operand layout;
 * each row of x is rounded into the same pairs, xg[K2 / 2][M], one uint32 per row (a
 * broadcast of one word per row and pair). Where the CPU lacks AVX512-BF16 (and in the
 * avx2 and neon builds) the same pairs are widened (a shift, a mask) and multiplied by
 * two FMAs. */
#if defined(NBP_ISA_AVX512)
#  define PAIR_ROWS 16    /* 16 rows x 1 panel = 16 of the 32 zmm as accumulators */
#else
#  define PAIR_ROWS 4     /* 4 rows x 2 ymm (AVX2) or 4 q (NEON); 2 weight halves each */
#endif

/* Whether this library runs vdpbf16ps on this CPU (code W_BF16_PAIRS_DOT). */
int nbp_bf16_dot(void) {
#if defined(NBP_ISA_AVX512)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    return 0;
#endif
}

/* float v as bf16 bits, rounded to nearest even; a NaN becomes the quiet NaN 0x7fc0 */
static inline uint32_t bf16_bits(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

/* x [M][K] -> xg [ceil(K / 2)][M] pairs (k, k + 1) rounded to bf16, 0 past K: with dot,
 * one uint32 each (k in the low half); else two floats each, so the FMAs' broadcasts load
 * from memory (splitting a word in integer registers made the 16-row K600 head 1.8x slower
 * on a Zen 5 with NBP_CPU_BF16=off) */
static void pair_rows(const float *x, int64_t M, int64_t K, uint32_t *xg, int dot) {
    for (int64_t i = 0; i < (K + 1) / 2; i++)
        for (int64_t m = 0; m < M; m++) {
            const uint32_t lo = bf16_bits(x[m * K + 2 * i]),
                           hi = 2 * i + 1 < K ? bf16_bits(x[m * K + 2 * i + 1]) : 0;
            if (dot) {
                xg[i * M + m] = lo | hi << 16;
            } else {
                xg[2 * (i * M + m)] = lo << 16;
                xg[2 * (i * M + m) + 1] = hi << 16;
            }
        }
}

/* rows (<= PAIR_ROWS) rows of xf (pair_rows' floats, from row m0) times one pair-packed
 * panel -> y[m0 ..][col0 : col0 + 16], starting from the bias: widened pairs, two FMAs */
static inline __attribute__((always_inline)) void tile_pairs(
        const float *xf, int64_t M, int64_t m0, int64_t pairs, const uint32_t *panel,
        const float *bias, float *y, int64_t n_out, int64_t col0, const int rows) {
    vf acc[PAIR_ROWS][SUB];
    for (int v = 0; v < SUB; v++) {
        const vf b = bias ? load_cols(bias, n_out, col0 + v * VLEN) : (vf){0};
        for (int m = 0; m < PAIR_ROWS; m++)
            acc[m][v] = b;
    }
    for (int64_t i = 0; i < pairs; i++) {
        const uint32_t *p = panel + i * PANEL;
        __builtin_prefetch((const char *)p + PREFETCH);
        vf w0[SUB], w1[SUB];
        for (int v = 0; v < SUB; v++) {
            const vu w = *(const vu *)(p + v * VLEN);
            w0[v] = (vf)(w << 16);
            w1[v] = (vf)(w & 0xffff0000u);
        }
        for (int m = 0; m < PAIR_ROWS; m++) {
            if (m < rows) {
                const float *xp = xf + 2 * (i * M + m0 + m);
                const vf x0 = xp[0] - (vf){0}, x1 = xp[1] - (vf){0};   /* broadcast loads */
                for (int v = 0; v < SUB; v++)
                    acc[m][v] += x0 * w0[v] + x1 * w1[v];
            }
        }
    }
    for (int m = 0; m < rows; m++)
        for (int v = 0; v < SUB; v++)
            store_cols(y + (m0 + m) * n_out, n_out, col0 + v * VLEN, acc[m][v]);
}

/* The row tiles of one panel (M, pairs, panel, bias, y, n_out, col0 in scope): full
 * tiles call tile with the constant PAIR_ROWS, so its loops unroll; the last with its
 * row count. */
#define PAIR_TILES(tile, x)                                                             \
    for (int64_t m0 = 0; m0 < M; m0 += PAIR_ROWS) {                                     \
        if (M - m0 >= PAIR_ROWS)                                                        \
            tile(x, M, m0, pairs, panel, bias, y, n_out, col0, PAIR_ROWS);              \
        else                                                                            \
            tile(x, M, m0, pairs, panel, bias, y, n_out, col0, (int)(M - m0));          \
    }

#if defined(NBP_ISA_AVX512)
/* tile_pairs by vdpbf16ps: one instruction per row and pair */
static inline __attribute__((always_inline, target("avx512bf16"))) void tile_dot(
        const uint32_t *xg, int64_t M, int64_t m0, int64_t pairs, const uint32_t *panel,
        const float *bias, float *y, int64_t n_out, int64_t col0, const int rows) {
    const __m512 b = (__m512)(bias ? load_cols(bias, n_out, col0) : (vf){0});
    __m512 acc[PAIR_ROWS];
    for (int m = 0; m < PAIR_ROWS; m++)
        acc[m] = b;
    const uint32_t *x = xg + m0;
    for (int64_t i = 0; i < pairs; i++) {
        const uint32_t *p = panel + i * PANEL;
        __builtin_prefetch((const char *)p + PREFETCH);
        const __m512bh w = (__m512bh)_mm512_loadu_si512(p);
        for (int m = 0; m < PAIR_ROWS; m++)
            if (m < rows)
                acc[m] = _mm512_dpbf16_ps(acc[m], w, (__m512bh)_mm512_set1_epi32((int)x[m]));
        x += M;
    }
    for (int m = 0; m < rows; m++)
        store_cols(y + (m0 + m) * n_out, n_out, col0, (vf)acc[m]);
}

static __attribute__((noinline, target("avx512bf16"))) void panel_dot(
        const uint32_t *xg, int64_t M, int64_t pairs, const uint32_t *panel, const float *bias,
        float *y, int64_t n_out, int64_t col0) {
    PAIR_TILES(tile_dot, xg)
}
#endif

static void panel_pairs(const float *xf, int64_t M, int64_t pairs, const uint32_t *panel,
                        const float *bias, float *y, int64_t n_out, int64_t col0) {
    PAIR_TILES(tile_pairs, xf)
}

/* y = xg @ W^T + bias, then the activation and residual, over panel groups */
static void linear_pairs(const uint32_t *xg, int64_t M, int64_t K, const uint32_t *wp,
                         const float *bias, float *y, int64_t n_out, int act,
                         const float *residual, int dot) {
    const int64_t n_panels = (n_out + PANEL - 1) / PANEL, pairs = (K + 1) / 2;
    (void)dot;   /* read by the avx512 build only */
    #pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n_panels; p += GROUP) {
        const int n = n_panels - p < GROUP ? (int)(n_panels - p) : GROUP;
        for (int j = 0; j < n; j++) {
            const uint32_t *panel = wp + (p + j) * pairs * PANEL;
#if defined(NBP_ISA_AVX512)
            if (dot) {
                panel_dot(xg, M, pairs, panel, bias, y, n_out, (p + j) * PANEL);
                continue;
            }
#endif
            panel_pairs((const float *)xg, M, pairs, panel, bias, y, n_out, (p + j) * PANEL);
        }
        if (act != ACT_NONE || residual)
            epilogue_cols(y, residual, M, n_out, p * PANEL, n * PANEL, act);
    }
}

/* x: [M][K] row-major fp32; wp: [ceil(n_out / 16)][K][16] of the weight dtype
 * (0 fp32, 1 bf16, 2 int8), or bf16 [ceil(n_out / 16)][ceil(K / 2)][16][2] with the
 * rows of x rounded to bf16 (3: FMAs, 4: vdpbf16ps; -1 where nbp_bf16_dot() is 0);
 * scale: [n_out] fp32 for int8, else ignored;
 * bias: [n_out] or NULL; y: [M][n_out] row-major fp32 =
 * act(norm(x) @ W^T + bias) + residual; act: 0 none, 1 exact GELU.
 * norm: 1 for the LayerNorm of each row of x first (gamma, beta: [K] fp32 or
 * NULL for 1 / 0; eps), 0 for none (gamma, beta, eps ignored); residual:
 * [M][n_out] fp32 or NULL (it may not overlap y). Returns 0, -1 for an unknown
 * dtype or act, -2 out of memory (nothing written). */
int nbp_packed_linear(const float *x, int64_t M, int64_t K, const void *wp, int dtype,
                      const float *scale, const float *bias, float *y, int64_t n_out, int act,
                      int norm, const float *gamma, const float *beta, float eps,
                      const float *residual) {
    if ((act != ACT_NONE && act != ACT_GELU) || dtype < W_F32 || dtype > W_BF16_PAIRS_DOT ||
        (dtype == W_BF16_PAIRS_DOT && !nbp_bf16_dot()))
        return -1;
    float *xn = NULL, *xt = NULL;
    if (norm) {   /* normalised once here: every panel group reads all the rows */
        xn = malloc((size_t)(M * K) * sizeof(float));
        if (!xn)
            return -2;
        layer_norm_rows(x, M, K, gamma, beta, eps, xn);
        x = xn;
    }
    if (dtype >= W_BF16_PAIRS) {   /* rounded into pairs once here, read by every group */
        const int dot = dtype == W_BF16_PAIRS_DOT;
        uint32_t *xg = malloc((size_t)(M * ((K + 1) / 2)) * (dot ? 1 : 2) * sizeof(uint32_t));
        if (!xg) {
            free(xn);
            return -2;
        }
        pair_rows(x, M, K, xg, dot);
        linear_pairs(xg, M, K, wp, bias, y, n_out, act, residual, dot);
        free(xg);
        free(xn);
        return 0;
    }
    const int packed = PACK_ROWS && M > 1 && n_out * K >= PACK_MIN_WEIGHTS;
    if (packed) {   /* transposed once here, read by every panel group */
        xt = malloc((size_t)((M + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS * K) * sizeof(float));
        if (!xt) {
            free(xn);
            return -2;
        }
        pack_rows(x, M, K, xt);
        x = xt;
    }
    switch (dtype) {
    case W_F32: linear_f32(x, M, K, wp, NULL, bias, y, n_out, act, residual, packed); break;
    case W_BF16: linear_bf16(x, M, K, wp, NULL, bias, y, n_out, act, residual, packed); break;
    default: linear_i8(x, M, K, wp, scale, bias, y, n_out, act, residual, packed); break;
    }
    free(xn);
    free(xt);
    return 0;
}
