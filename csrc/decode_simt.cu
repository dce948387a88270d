// Split-KV decode attention on CUDA cores, for fp32 (tensor cores would round
// to tf32). Same work split as decode_mma.cu; each lane owns D / 32 columns of
// q and o, and every score is a warp all-reduce. Templated on the query-tile
// height: LT = 1 for L = 1, LT = 16 (ceil(L / 16) tiles) otherwise.
#include "common.cuh"

namespace nbp {
namespace {

template <int D, int LT> struct Simt {
  static constexpr int kCols = D / 32;        // columns per lane
  static constexpr int kGroup = LT == 1 ? 8 : 2;  // keys per online-softmax update
  static constexpr int kSmemBytes = (2 * kWarps * LT + kWarps * LT * D) * 4;
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <int D, int LT>
__device__ __forceinline__ void attend_group(const DecodeParams& p, const char* kc, const char* vc,
                                             const char* kn, const char* vn, int s, int c, int end,
                                             const float (&q)[LT][D / 32], float (&o)[LT][D / 32],
                                             float (&m)[LT], float (&l)[LT]) {
  using S = Simt<D, LT>;
  const int lane = threadIdx.x & 31;
  float kv[S::kGroup][S::kCols], vv[S::kGroup][S::kCols];
#pragma unroll
  for (int k = 0; k < S::kGroup; ++k) {
    const int pos = c + k;
    const bool ok = pos < end;
    const float* kr = ok ? reinterpret_cast<const float*>(kv_row(kc, p.kc_ss, kn, p.kn_ss, p.has_new, s, pos, 4)) : nullptr;
    const float* vr = ok ? reinterpret_cast<const float*>(kv_row(vc, p.vc_ss, vn, p.vn_ss, p.has_new, s, pos, 4)) : nullptr;
#pragma unroll
    for (int i = 0; i < S::kCols; ++i) {
      kv[k][i] = ok ? kr[lane + 32 * i] : 0.f;
      vv[k][i] = ok ? vr[lane + 32 * i] : 0.f;
    }
  }
#pragma unroll
  for (int r = 0; r < LT; ++r) {
    float sc[S::kGroup];
    float mx = m[r];
#pragma unroll
    for (int k = 0; k < S::kGroup; ++k) {
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < S::kCols; ++i) d = fmaf(q[r][i], kv[k][i], d);
      d = warp_sum(d);
      sc[k] = c + k < end ? d : -INFINITY;
      mx = fmaxf(mx, sc[k]);
    }
    // Key c < end is valid, so mx is finite.
    const float alpha = fast_exp2(m[r] - mx);
    m[r] = mx;
    l[r] *= alpha;
#pragma unroll
    for (int i = 0; i < S::kCols; ++i) o[r][i] *= alpha;
#pragma unroll
    for (int k = 0; k < S::kGroup; ++k) {
      const float pk = fast_exp2(sc[k] - mx);
      l[r] += pk;
#pragma unroll
      for (int i = 0; i < S::kCols; ++i) o[r][i] = fmaf(pk, vv[k][i], o[r][i]);
    }
  }
}

template <int D, int LT>
__global__ void __launch_bounds__(kThreads) decode_simt_kernel(const DecodeParams p) {
  using S = Simt<D, LT>;
  __shared__ __align__(16) float sm[S::kSmemBytes / 4];
  const int split = blockIdx.x, h = blockIdx.y / p.qtiles, qt = blockIdx.y % p.qtiles;
  const int b = blockIdx.z, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int s = clamp_len(p.seq_lens[b], p.M);
  const int n = min(s + p.L, p.M);
  if (p.has_new && split == 0 && qt == 0) append_block(p, b, h, s, D * 4, 4);

  int start, end;
  split_range(n, p.num_splits, split, start, end);
  float q[LT][S::kCols], o[LT][S::kCols], m[LT], l[LT];
  const float* qb = reinterpret_cast<const float*>(p.q) + b * p.q_sb + h * p.q_sh;
#pragma unroll
  for (int r = 0; r < LT; ++r) {
    const int row = qt * LT + r;
#pragma unroll
    for (int i = 0; i < S::kCols; ++i) {
      q[r][i] = row < p.L ? qb[row * p.q_ss + lane + 32 * i] * p.scale_log2 : 0.f;
      o[r][i] = 0.f;
    }
    m[r] = -INFINITY;
    l[r] = 0.f;
  }
  const char* kc = p.kc + (b * p.kc_sb + h * p.kc_sh) * 4;
  const char* vc = p.vc + (b * p.vc_sb + h * p.vc_sh) * 4;
  const char* kn = p.has_new ? p.kn + (b * p.kn_sb + h * p.kn_sh) * 4 : nullptr;
  const char* vn = p.has_new ? p.vn + (b * p.vn_sb + h * p.vn_sh) * 4 : nullptr;
  for (int c = start + warp * S::kGroup; c < end; c += kWarps * S::kGroup) {
    attend_group<D, LT>(p, kc, vc, kn, vn, s, c, end, q, o, m, l);
  }
  float* sm_m = sm;
  float* sm_l = sm + kWarps * LT;
  float* sm_o = sm + 2 * kWarps * LT;
#pragma unroll
  for (int r = 0; r < LT; ++r) {
    if (lane == 0) {
      sm_m[warp * LT + r] = m[r];
      sm_l[warp * LT + r] = l[r];
    }
#pragma unroll
    for (int i = 0; i < S::kCols; ++i) sm_o[(warp * LT + r) * D + lane + 32 * i] = o[r][i];
  }
  __syncthreads();
  cta_finish<float, D, LT>(p, sm, b, h, qt, split);
}

template <int D, int LT>
void launch_lt(const DecodeArgs& a, cudaStream_t stream) {
  const DecodeParams p = make_params(a, (a.L + LT - 1) / LT);
  dim3 grid(p.num_splits, p.H * p.qtiles, a.batch);
  decode_simt_kernel<D, LT><<<grid, kThreads, 0, stream>>>(p);
}

template <int D>
void launch_d(const DecodeArgs& a, cudaStream_t stream) {
  if (a.L == 1) launch_lt<D, 1>(a, stream);
  else launch_lt<D, 16>(a, stream);
}

}  // namespace

void launch_decode_simt(const DecodeArgs& a, void* stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (a.head_dim) {
    case 64: launch_d<64>(a, st); break;
    case 96: launch_d<96>(a, st); break;
    case 128: launch_d<128>(a, st); break;
    default: throw std::invalid_argument("head_dim: the CUDA decode kernel supports 64, 96, 128");
  }
  check_launch("block_decode_attention (simt)");
}

}  // namespace nbp
