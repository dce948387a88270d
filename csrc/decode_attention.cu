// Decode-step entry points: parameter packing, the split-KV merge kernel, the
// choice of kernel (tensor-core for fp16/bf16, CUDA-core for fp32) and of the
// number of splits.
#include "common.cuh"

#ifndef NBP_ARCHS
#define NBP_ARCHS "unknown"
#endif

namespace nbp {

void launch_decode_mma(const DecodeArgs& a, void* stream);
void launch_decode_simt(const DecodeArgs& a, void* stream);

DecodeParams make_params(const DecodeArgs& a, int qtiles) {
  DecodeParams p{};
  p.q = static_cast<const char*>(a.q.ptr); p.q_sb = a.q.sb; p.q_sh = a.q.sh; p.q_ss = a.q.ss;
  set_cache_io(p, a);
  p.out = static_cast<char*>(a.out.ptr); p.o_sb = a.out.sb; p.o_sh = a.out.sh; p.o_ss = a.out.ss;
  p.num_splits = a.num_splits; p.qtiles = qtiles;
  p.has_new = a.has_new;
  p.scale_log2 = a.scale * kLog2e;
  p.part_o = a.part_o;
  p.part_lse = a.part_lse;
  return p;
}

namespace {

// One CTA per output row (b, h, r): weights 2^(lse_s - max) over the splits.
// Empty splits carry lse = -inf and are skipped without reading their o.
template <typename T>
__global__ void __launch_bounds__(128) merge_splits_kernel(const float* __restrict__ part_o,
                                                           const float* __restrict__ part_lse,
                                                           char* out, int64_t o_sb, int64_t o_sh,
                                                           int64_t o_ss, int H, int L, int S, int D) {
  __shared__ float w[kMaxSplits];
  __shared__ float inv_total;
  const int row = blockIdx.x;  // (b * H + h) * L + r
  const int r = row % L, bh = row / L, h = bh % H, b = bh / H;
  const float* lse = part_lse + (int64_t)row * S;
  if (threadIdx.x < 32) {
    float mx = -INFINITY;
    for (int s = threadIdx.x; s < S; s += 32) mx = fmaxf(mx, lse[s]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float tot = 0.f;
    for (int s = threadIdx.x; s < S; s += 32) {
      const float ws = mx == -INFINITY ? 0.f : fast_exp2(lse[s] - mx);
      w[s] = ws;
      tot += ws;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
    if (threadIdx.x == 0) inv_total = tot > 0.f ? 1.f / tot : 0.f;
  }
  __syncthreads();
  T* dst = reinterpret_cast<T*>(out) + b * o_sb + h * o_sh + r * o_ss;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) {
      if (w[s] > 0.f) acc = fmaf(w[s], part_o[((int64_t)row * S + s) * D + d], acc);
    }
    dst[d] = from_float<T>(acc * inv_total);
  }
}

template <typename T>
void launch_merge(const DecodeArgs& a, cudaStream_t stream) {
  const int rows = a.batch * a.heads * a.L;
  merge_splits_kernel<T><<<rows, 128, 0, stream>>>(a.part_o, a.part_lse,
                                                   static_cast<char*>(a.out.ptr), a.out.sb, a.out.sh,
                                                   a.out.ss, a.heads, a.L, a.num_splits, a.head_dim);
}

}  // namespace

void launch_decode(const DecodeArgs& a, void* stream) {
  if (a.dtype == kFloat32) launch_decode_simt(a, stream);
  else launch_decode_mma(a, stream);
  if (a.num_splits == 1) return;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kFloat32: launch_merge<float>(a, st); break;
    case kFloat16: launch_merge<__half>(a, st); break;
    default: launch_merge<__nv_bfloat16>(a, st); break;
  }
  check_launch("block_decode_attention (merge)");
}

namespace {

// CTAs of 128 threads resident per SM, from the kernels' register use on
// sm_90a (ptxas -v: mma 124/167/233 registers for D = 64/96/128; fp32 16-row
// tiles 138/177/251); shared memory is not the limit for any of them.
int resident_ctas(int dtype, int head_dim, int L) {
  if (dtype != kFloat32) return head_dim <= 64 ? 4 : (head_dim <= 96 ? 3 : 2);
  if (L == 1) return 4;
  return head_dim <= 64 ? 3 : 2;
}

}  // namespace

int decode_num_splits(int batch, int heads, int L, int max_seq, int head_dim, int dtype, int num_sms) {
  // As many splits as fit one wave of resident CTAs (a second, partial wave
  // would leave most SMs idle), but a split must cover enough keys that its
  // fp32 partial (16 rows x D) stays small next to the K/V it reads, and never
  // more than the keys allow.
  const int qtiles = dtype == kFloat32 && L == 1 ? 1 : (L + 15) / 16;
  const int64_t ctas = (int64_t)batch * heads * qtiles;
  const int64_t wave = (int64_t)resident_ctas(dtype, head_dim, L) * (num_sms > 0 ? num_sms : 1);
  int64_t s = wave / ctas;
  const int min_keys = L == 1 ? kSplitGranule : 2 * kSplitGranule;
  const int64_t by_len = ((int64_t)max_seq + min_keys - 1) / min_keys;
  if (s > by_len) s = by_len;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : (int)s;
}

const char* compiled_archs() { return NBP_ARCHS; }
int cuda_runtime_version_compiled() { return CUDART_VERSION; }

}  // namespace nbp
