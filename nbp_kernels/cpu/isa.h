/* isa.h: the instruction set a C kernel is compiled for, the same for every kernel.
 *
 * cpu_build.py compiles each kernel of cpu/ once per ISA with -DNBP_ISA_<isa> and that ISA's
 * -m flags. This header checks that the flags arrived, includes the x86 intrinsics, and
 * defines ISA_NAME, VLEN (float32 lanes of a vector register), X86 on the x86-64 ISAs
 * and nbp_cpu_isa(), which cpu_build.py compares with the ISA it asked for. Tile sizes
 * stay in each kernel: they depend on its own register use.
 */
#ifndef NBP_ISA_H
#define NBP_ISA_H

#if defined(NBP_ISA_AVX512)
#  if !defined(__AVX512F__) || !defined(__AVX512DQ__) || !defined(__FMA__)
#    error "NBP_ISA_AVX512 needs -mavx512f -mavx512dq -mfma"
#  endif
#  include <immintrin.h>
#  define ISA_NAME "avx512"
#  define VLEN 16
#  define X86 1
#elif defined(NBP_ISA_AVX2)
#  if !defined(__AVX2__) || !defined(__FMA__)
#    error "NBP_ISA_AVX2 needs -mavx2 -mfma"
#  endif
#  include <immintrin.h>
#  define ISA_NAME "avx2"
#  define VLEN 8
#  define X86 1
#elif defined(NBP_ISA_NEON)
#  if !defined(__aarch64__)
#    error "NBP_ISA_NEON needs AArch64"
#  endif
#  define ISA_NAME "neon"
#  define VLEN 4
#elif defined(NBP_ISA_PORTABLE)
/* the NEON build's source (no intrinsics, 4 float lanes) compiled for the host's baseline
 * (SSE2 on x86-64): it runs that code where no AArch64 machine is at hand */
#  define ISA_NAME "portable"
#  define VLEN 4
#else
#  error "compile with -DNBP_ISA_AVX512, -DNBP_ISA_AVX2, -DNBP_ISA_NEON or -DNBP_ISA_PORTABLE"
#endif

const char *nbp_cpu_isa(void) { return ISA_NAME; }

#endif
