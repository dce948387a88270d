// Device helpers shared by the decode kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "nbp_ops.h"

namespace nbp {

constexpr int kWarps = 4;            // warps per CTA in every decode kernel
constexpr int kThreads = kWarps * 32;
constexpr int kSplitGranule = 64;    // a split covers a multiple of this many keys
constexpr float kLog2e = 1.4426950408889634f;

inline void check_launch(const char* what) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(e));
  }
}

// The cache and new-block pointers/strides and the lengths, named alike in
// every kernel params struct that touches the caches (decode and append).
template <typename Params, typename Args>
inline void set_cache_io(Params& p, const Args& a) {
  p.kc = static_cast<char*>(a.k_cache.ptr);
  p.kc_sb = a.k_cache.sb; p.kc_sh = a.k_cache.sh; p.kc_ss = a.k_cache.ss;
  p.vc = static_cast<char*>(a.v_cache.ptr);
  p.vc_sb = a.v_cache.sb; p.vc_sh = a.v_cache.sh; p.vc_ss = a.v_cache.ss;
  p.kn = static_cast<const char*>(a.k_new.ptr);
  p.kn_sb = a.k_new.sb; p.kn_sh = a.k_new.sh; p.kn_ss = a.k_new.ss;
  p.vn = static_cast<const char*>(a.v_new.ptr);
  p.vn_sb = a.v_new.sb; p.vn_sh = a.v_new.sh; p.vn_ss = a.v_new.ss;
  p.seq_lens = a.seq_lens;
  p.H = a.heads; p.L = a.L; p.M = a.max_seq;
}

// The kernels' view of DecodeArgs (same data, typed pointers resolved per kernel).
struct DecodeParams {
  const char* q; int64_t q_sb, q_sh, q_ss;
  char* kc; int64_t kc_sb, kc_sh, kc_ss;
  char* vc; int64_t vc_sb, vc_sh, vc_ss;
  const char* kn; int64_t kn_sb, kn_sh, kn_ss;
  const char* vn; int64_t vn_sb, vn_sh, vn_ss;
  char* out; int64_t o_sb, o_sh, o_ss;
  const int32_t* seq_lens;
  int H, L, M, num_splits, qtiles;
  bool has_new;
  float scale_log2;  // softmax scale * log2(e): scores live in the exp2 domain
  float* part_o;
  float* part_lse;
};

DecodeParams make_params(const DecodeArgs& a, int qtiles);

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // ex2(-inf) = +0
  return y;
}

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Clamp a device-side length so a bad (unchecked) value can never address
// memory outside the cache.
__device__ __forceinline__ int clamp_len(int s, int M) { return s < 0 ? 0 : (s > M ? M : s); }

// Key range [start, end) of split `split` among `n` visible keys. The split
// size depends on the per-sequence n (read on the device), so all splits of a
// short sequence share its work instead of idling.
__device__ __forceinline__ void split_range(int n, int num_splits, int split, int& start, int& end) {
  int chunk = (n + num_splits - 1) / num_splits;
  chunk = (chunk + kSplitGranule - 1) / kSplitGranule * kSplitGranule;
  start = split * chunk;
  end = min(start + chunk, n);
}

// Row `pos` of the visible sequence: the cache, except the block being appended
// in this launch, which is read from k_new/v_new so that no CTA depends on
// another CTA's cache writes.
__device__ __forceinline__ const char* kv_row(const char* cache, int64_t c_ss, const char* nw,
                                              int64_t n_ss, bool has_new, int s, int pos,
                                              int elem) {
  return (has_new && pos >= s) ? nw + (int64_t)(pos - s) * n_ss * elem
                               : cache + (int64_t)pos * c_ss * elem;
}

// Cooperative copy of the new block of (b, h) into both caches at [s, s + L),
// never past max_seq. Row bytes are a multiple of 16 (checked at the boundary).
__device__ __forceinline__ void append_block(const DecodeParams& p, int b, int h, int s,
                                             int row_bytes, int elem) {
  const int vpr = row_bytes / 16;
  const char* kn = p.kn + (b * p.kn_sb + h * p.kn_sh) * elem;
  const char* vn = p.vn + (b * p.vn_sb + h * p.vn_sh) * elem;
  char* kc = p.kc + (b * p.kc_sb + h * p.kc_sh) * elem;
  char* vc = p.vc + (b * p.vc_sb + h * p.vc_sh) * elem;
  for (int i = threadIdx.x; i < p.L * vpr; i += blockDim.x) {
    const int l = i / vpr, v = i % vpr;
    if (s + l >= p.M) continue;
    const int64_t src_k = (int64_t)l * p.kn_ss * elem + v * 16;
    const int64_t src_v = (int64_t)l * p.vn_ss * elem + v * 16;
    reinterpret_cast<uint4*>(kc + (int64_t)(s + l) * p.kc_ss * elem)[v] =
        *reinterpret_cast<const uint4*>(kn + src_k);
    reinterpret_cast<uint4*>(vc + (int64_t)(s + l) * p.vc_ss * elem)[v] =
        *reinterpret_cast<const uint4*>(vn + src_v);
  }
}

// Merge the per-warp online-softmax states (m, l in the exp2 domain, o
// unnormalised), laid out in shared memory as m[kWarps][LT], l[kWarps][LT],
// o[kWarps][LT][D], and write either the final output (one split) or this
// split's partial (normalised o and its log2-sum-exp).
template <typename T, int D, int LT>
__device__ void cta_finish(const DecodeParams& p, const float* sm, int b, int h, int qt, int split) {
  const float* sm_m = sm;
  const float* sm_l = sm + kWarps * LT;
  const float* sm_o = sm + 2 * kWarps * LT;
  for (int i = threadIdx.x; i < LT * D; i += blockDim.x) {
    const int r = i / D, d = i % D;
    const int row = qt * LT + r;
    if (row >= p.L) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sm_m[w * LT + r]);
    float tot = 0.f, acc = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = fast_exp2(sm_m[w * LT + r] - mx);
        tot += sm_l[w * LT + r] * f;
        acc += sm_o[(w * LT + r) * D + d] * f;
      }
    }
    if (p.num_splits == 1) {
      T* out = reinterpret_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh + row * p.o_ss;
      out[d] = from_float<T>(tot > 0.f ? acc / tot : 0.f);
    } else {
      const int64_t prow = ((int64_t)(b * p.H + h) * p.L + row) * p.num_splits + split;
      if (tot > 0.f) p.part_o[prow * D + d] = acc / tot;
      if (d == 0) p.part_lse[prow] = tot > 0.f ? mx + __log2f(tot) : -INFINITY;
    }
  }
}

}  // namespace nbp
