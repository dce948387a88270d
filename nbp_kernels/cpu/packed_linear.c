/* packed_linear: y = x @ W^T for few rows of x (fp32, CPU, AVX-512), W pre-packed.
 *
 * Decode steps feed 1..~32 rows through every linear. MKL treats such a product
 * as a general GEMM and repacks the weight on every call, so a 16-row product
 * streams the weight about twice and runs at a third of the core's FMA peak.
 * Here the weight is packed once into panels of 16 output columns,
 * wp[panel][k][16] (contiguous). Three panels at a time are streamed from
 * memory once, against tiles of 8 rows of x: each k loads 3 weight vectors and
 * broadcasts 8 x values, 24 FMAs, so loads do not bound the FMA rate; a second
 * row tile (rows 9..16) finds the panels in L2. A software prefetch 4 KiB ahead
 * keeps the stream going while the FMAs run (the hardware prefetcher alone
 * left half the bandwidth unused). One row (NTP) is the same tile with one row:
 * three weight streams at a time.
 *
 * Threads: OpenMP over panel groups. The process's OpenMP runtime is torch's
 * (libgomp.so.1 is already loaded when this library is opened), so
 * torch.set_num_threads applies and no second thread pool competes for cores.
 *
 * Compiled at first use by nbp_kernels/cpu_build.py; nbp_kernels/packed_linear.py
 * has the Python contract, nbp_kernels/reference.py the semantics.
 */
#include <stdint.h>

#define PANEL 16          /* output columns per panel: one zmm register */
#define TILE_ROWS 8       /* rows of x per register tile */
#define TILE_PANELS 3     /* panels per register tile: 8 x 3 accumulators */
#define PREFETCH 1024     /* floats ahead in the weight stream (4 KiB) */

int nbp_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
}

#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#include <immintrin.h>

static inline __mmask16 column_mask(int64_t n_out, int64_t col0) {
    int64_t cols = n_out - col0 < PANEL ? n_out - col0 : PANEL;
    return (__mmask16)((1u << cols) - 1u);
}

static inline __m512 bias_or_zero(const float *bias, int64_t n_out, int64_t col0) {
    return bias ? _mm512_maskz_loadu_ps(column_mask(n_out, col0), bias + col0) : _mm512_setzero_ps();
}

/* rows (<= TILE_ROWS) rows of x [rows][K] times n_panels (<= TILE_PANELS)
 * consecutive panels [K][16] (+ bias) -> y[rows][col0 : col0 + 16 n_panels].
 * Each broadcast x value feeds TILE_PANELS FMAs, so loads do not bound the
 * FMA rate (8 x 3 accumulators: 24 of the 32 vector registers). Inlined so the
 * common tiles (8 rows, and the single row of an NTP step) compile without guards. */
static inline __attribute__((always_inline)) void tile(
        const float *x, int64_t K, const float *panels, const float *bias, float *y,
        int64_t n_out, int64_t col0, const int rows, const int n_panels) {
    __m512 acc[TILE_ROWS][TILE_PANELS];
    for (int j = 0; j < TILE_PANELS; j++) {
        __m512 b = j < n_panels ? bias_or_zero(bias, n_out, col0 + j * PANEL) : _mm512_setzero_ps();
        for (int m = 0; m < TILE_ROWS; m++)
            acc[m][j] = b;
    }
    for (int64_t k = 0; k < K; k++) {
        __m512 w[TILE_PANELS];
        for (int j = 0; j < TILE_PANELS; j++) {
            if (j < n_panels) {
                const float *p = panels + (j * K + k) * PANEL;
                _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);
                w[j] = _mm512_loadu_ps(p);
            }
        }
        for (int m = 0; m < TILE_ROWS; m++) {
            if (m < rows) {
                __m512 xv = _mm512_set1_ps(x[m * K + k]);
                for (int j = 0; j < TILE_PANELS; j++)
                    if (j < n_panels)
                        acc[m][j] = _mm512_fmadd_ps(xv, w[j], acc[m][j]);
            }
        }
    }
    for (int j = 0; j < n_panels; j++) {
        __mmask16 mask = column_mask(n_out, col0 + j * PANEL);
        for (int m = 0; m < rows; m++)
            _mm512_mask_storeu_ps(y + m * n_out + col0 + j * PANEL, mask, acc[m][j]);
    }
}

/* x: [M][K] row-major; wp: [ceil(n_out / 16)][K][16]; bias: [n_out] or NULL;
 * y: [M][n_out] row-major. */
void nbp_packed_linear(const float *x, int64_t M, int64_t K, const float *wp, const float *bias,
                       float *y, int64_t n_out) {
    int64_t n_panels = (n_out + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n_panels; p += TILE_PANELS) {
        int n = n_panels - p < TILE_PANELS ? (int)(n_panels - p) : TILE_PANELS;
        const float *panels = wp + p * K * PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
            int rows = M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS;
            if (rows == TILE_ROWS && n == TILE_PANELS)
                tile(x + m0 * K, K, panels, bias, y + m0 * n_out, n_out, p * PANEL, TILE_ROWS,
                     TILE_PANELS);
            else if (rows == 1 && n == TILE_PANELS)
                tile(x + m0 * K, K, panels, bias, y + m0 * n_out, n_out, p * PANEL, 1, TILE_PANELS);
            else
                tile(x + m0 * K, K, panels, bias, y + m0 * n_out, n_out, p * PANEL, rows, n);
        }
    }
}

#pragma GCC pop_options
