/* cpu_peak: the multiply-add peak of this CPU at the kernels' vector width, from loops
 * that touch no memory: 12 independent accumulator chains per thread (more than an FMA's
 * latency times its issue rate on current x86 cores), each step one float32 FMA, or one
 * int8 dot product (VNNI's vpdpbusd, 4 multiply-adds a lane). No kernel can beat these
 * rates, so a step's multiply-adds over them give a floor its time cannot go below.
 * cpu_peak.py compiles this with cpu_build's flags for the ISA in force (isa.h).
 */
#include <stdint.h>
#include <omp.h>
#include "isa.h"   /* VLEN, nbp_cpu_isa */

typedef float vf __attribute__((vector_size(VLEN * 4)));

/* twelve named chains: an array of them was kept on the stack at -O2 */
#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

/* float32 multiply-adds per second over `threads` threads, `iters` steps each */
double nbp_fma_peak(int64_t iters, int threads) {
    double t0 = omp_get_wtime();
    float sink = 0.0f;
    #pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        const vf b = (vf){0} + 0.999f, c = (vf){0} + 1e-4f;
#define DECLARE(i) vf a##i = (vf){0} + (float)(i);
#define STEP(i) a##i = a##i * b + c;
        CHAINS(DECLARE)
        for (int64_t it = 0; it < iters; it++) {
            CHAINS(STEP)
        }
#define SUM(i) + a##i[0]
        sink += 0.0f CHAINS(SUM);
    }
    double t = omp_get_wtime() - t0;
    return sink == 12345.0f ? 0.0 : (double)iters * 12 * VLEN * threads / t;
}

/* int8 multiply-adds per second by vpdpbusd on zmm (0 where this build or CPU has no
 * AVX512-VNNI) */
#if defined(NBP_ISA_AVX512)
__attribute__((target("avx512vnni"))) static double vnni(int64_t iters, int threads) {
    double t0 = omp_get_wtime();
    int sink = 0;
    #pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        const __m512i b = _mm512_set1_epi32(0x01010101), c = _mm512_set1_epi32(0x02020202);
#define IDECLARE(i) __m512i a##i = _mm512_set1_epi32(i);
#define ISTEP(i) a##i = _mm512_dpbusd_epi32(a##i, b, c);
#define ISUM(i) + _mm512_reduce_add_epi32(a##i)
        CHAINS(IDECLARE)
        for (int64_t it = 0; it < iters; it++) {
            CHAINS(ISTEP)
        }
        sink += 0 CHAINS(ISUM);
    }
    double t = omp_get_wtime() - t0;
    return sink == 12345 ? 0.0 : (double)iters * 12 * 64 * threads / t;
}
#endif

double nbp_int8_dot_peak(int64_t iters, int threads) {
#if defined(NBP_ISA_AVX512)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512vnni"))
        return vnni(iters, threads);
#endif
    (void)iters;
    (void)threads;
    return 0.0;
}
