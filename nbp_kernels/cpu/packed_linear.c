/* packed_linear: y = x @ W^T for few rows of x (fp32, CPU, AVX-512), W pre-packed.
 *
 * Decode steps feed 1..~32 rows through every linear. MKL treats such a product
 * as a general GEMM and repacks the weight on every call, so a 16-row product
 * streams the weight about twice and runs at a third of the core's FMA peak.
 * Here the weight is packed once into panels of 16 output columns,
 * wp[panel][k][16] (contiguous), and each panel is streamed from memory once:
 * up to 16 rows of x (kept in L1) are broadcast against each panel row with one
 * FMA per row, so 16 rows cost about what one row costs while the weight stream,
 * not the arithmetic, is the limit. A software prefetch 4 KiB ahead keeps the
 * stream going while the FMAs run (the hardware prefetcher alone left half the
 * bandwidth unused).
 *
 * Threads: OpenMP over panels. The process's OpenMP runtime is torch's
 * (libgomp.so.1 is already loaded when this library is opened), so
 * torch.set_num_threads applies and no second thread pool competes for cores.
 *
 * Compiled at first use by nbp_kernels/cpu_build.py; nbp_kernels/packed_linear.py has the
 * Python contract, and nbp_kernels/reference.py for the semantics.
 */
#include <stdint.h>

#define PANEL 16          /* output columns per panel: one zmm register */
#define ROWS 16           /* rows of x per register block: 16 accumulators */
#define GEMV_PANELS 4     /* panels streamed together when x has one row */
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

/* rows (<= ROWS) rows of x [rows][K] times one panel [K][16] (+ bias) -> y[rows][col0 : col0 + 16].
 * Inlined so the full block (rows == ROWS, the common case) compiles without row guards. */
static inline __attribute__((always_inline)) void panel_block(
        const float *x, int64_t K, const float *panel, const float *bias, float *y, int64_t n_out,
        int64_t col0, const int rows) {
    __m512 acc[ROWS];
    for (int m = 0; m < ROWS; m++)
        acc[m] = bias_or_zero(bias, n_out, col0);
    for (int64_t k = 0; k < K; k++) {
        _mm_prefetch((const char *)(panel + k * PANEL + PREFETCH), _MM_HINT_T0);
        __m512 w = _mm512_loadu_ps(panel + k * PANEL);
#pragma GCC unroll 16
        for (int m = 0; m < ROWS; m++)
            if (m < rows)
                acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), w, acc[m]);
    }
    __mmask16 mask = column_mask(n_out, col0);
    for (int m = 0; m < rows; m++)
        _mm512_mask_storeu_ps(y + m * n_out + col0, mask, acc[m]);
}

/* One row of x times n_panels (<= GEMV_PANELS) consecutive panels: several
 * independent weight streams keep the memory system busy. */
static void panel_gemv(const float *x, int64_t K, const float *panels, const float *bias, float *y,
                       int64_t n_out, int64_t col0, int n_panels) {
    __m512 acc[GEMV_PANELS];
    for (int j = 0; j < GEMV_PANELS; j++)
        acc[j] = j < n_panels ? bias_or_zero(bias, n_out, col0 + j * PANEL) : _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m512 xv = _mm512_set1_ps(x[k]);
        for (int j = 0; j < GEMV_PANELS; j++) {
            if (j < n_panels) {
                const float *p = panels + (j * K + k) * PANEL;
                _mm_prefetch((const char *)(p + PREFETCH), _MM_HINT_T0);
                acc[j] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(p), acc[j]);
            }
        }
    }
    for (int j = 0; j < n_panels; j++)
        _mm512_mask_storeu_ps(y + col0 + j * PANEL, column_mask(n_out, col0 + j * PANEL), acc[j]);
}

/* x: [M][K] row-major; wp: [ceil(n_out / 16)][K][16]; bias: [n_out] or NULL;
 * y: [M][n_out] row-major. */
void nbp_packed_linear(const float *x, int64_t M, int64_t K, const float *wp, const float *bias,
                       float *y, int64_t n_out) {
    int64_t n_panels = (n_out + PANEL - 1) / PANEL;
    if (M == 1) {
#pragma omp parallel for schedule(static)
        for (int64_t p = 0; p < n_panels; p += GEMV_PANELS) {
            int n = n_panels - p < GEMV_PANELS ? (int)(n_panels - p) : GEMV_PANELS;
            panel_gemv(x, K, wp + p * K * PANEL, bias, y, n_out, p * PANEL, n);
        }
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t p = 0; p < n_panels; p++) {
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const float *xb = x + m0 * K, *panel = wp + p * K * PANEL;
            if (M - m0 >= ROWS)
                panel_block(xb, K, panel, bias, y + m0 * n_out, n_out, p * PANEL, ROWS);
            else
                panel_block(xb, K, panel, bias, y + m0 * n_out, n_out, p * PANEL, (int)(M - m0));
        }
    }
}

#pragma GCC pop_options
