// Split-KV decode attention on tensor cores (mma.sync m16n8k16, sm_80+), for
// fp16/bf16. A CTA handles one (batch, head, 16-query tile, KV split); its 4
// warps walk the split's keys in interleaved chunks of 16, each keeping an
// online softmax for the tile's 16 rows in registers. L = 16 is exactly one
// tile; any other L (1..256) uses ceil(L / 16) tiles with the rows past L
// zero-padded (decode is memory-bound, so the padded rows cost nothing that
// matters).
#include "common.cuh"

namespace nbp {
namespace {

constexpr int kChunk = 16;  // keys per warp step: two n8 tiles for QK^T, one k16 step for PV

template <typename T> struct MmaOp;
template <> struct MmaOp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct MmaOp<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

__device__ __forceinline__ uint32_t pack16(uint16_t lo, uint16_t hi) {
  return (uint32_t)lo | ((uint32_t)hi << 16);
}

template <int D> struct Tile {
  static constexpr int kLds = D + 8;              // padded smem row (halves): conflict-free fragment reads
  static constexpr int kVecPerRow = D / 8;        // 16-byte vectors per row
  static constexpr int kVecPerLane = kChunk * kVecPerRow / 32;
  static constexpr int kStageHalves = 2 * kChunk * kLds;  // K and V chunk of one warp
  static constexpr int kStageBytes = kWarps * kStageHalves * 2;
  static constexpr int kFinishBytes = (2 * kWarps * 16 + kWarps * 16 * D) * 4;
  static constexpr int kSmemBytes = kStageBytes > kFinishBytes ? kStageBytes : kFinishBytes;
  static_assert(kChunk * kVecPerRow % 32 == 0, "chunk must split evenly over the warp");
};

// Global -> registers: this lane's share of the K and V rows [c, c + 16) (zero past `end`).
template <int D>
__device__ __forceinline__ void load_chunk(const DecodeParams& p, const char* kc, const char* vc,
                                           const char* kn, const char* vn, int s, int c, int end,
                                           uint4 (&kr)[Tile<D>::kVecPerLane],
                                           uint4 (&vr)[Tile<D>::kVecPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < Tile<D>::kVecPerLane; ++i) {
    const int idx = lane + 32 * i;
    const int row = idx / Tile<D>::kVecPerRow, v = idx % Tile<D>::kVecPerRow;
    const int pos = c + row;
    if (pos < end) {
      kr[i] = reinterpret_cast<const uint4*>(kv_row(kc, p.kc_ss, kn, p.kn_ss, p.has_new, s, pos, 2))[v];
      vr[i] = reinterpret_cast<const uint4*>(kv_row(vc, p.vc_ss, vn, p.vn_ss, p.has_new, s, pos, 2))[v];
    } else {
      kr[i] = make_uint4(0, 0, 0, 0);
      vr[i] = make_uint4(0, 0, 0, 0);
    }
  }
}

template <int D>
__device__ __forceinline__ void store_chunk(uint16_t* ks, uint16_t* vs,
                                            const uint4 (&kr)[Tile<D>::kVecPerLane],
                                            const uint4 (&vr)[Tile<D>::kVecPerLane]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i = 0; i < Tile<D>::kVecPerLane; ++i) {
    const int idx = lane + 32 * i;
    const int row = idx / Tile<D>::kVecPerRow, v = idx % Tile<D>::kVecPerRow;
    *reinterpret_cast<uint4*>(ks + row * Tile<D>::kLds + v * 8) = kr[i];
    *reinterpret_cast<uint4*>(vs + row * Tile<D>::kLds + v * 8) = vr[i];
  }
}

// Per-warp online-softmax state for 16 query rows: this lane holds rows g and
// g + 8 (g = lane / 4) and, of o, columns 8j + 2t, 8j + 2t + 1 (t = lane % 4).
template <int D> struct WarpState {
  float o[D / 8][4];
  float m[2], l[2];
};

template <typename T, int D>
__device__ __forceinline__ void attend_chunk(WarpState<D>& st, const uint32_t (&qf)[D / 16][4],
                                             const uint16_t* ks, const uint16_t* vs, int c, int end,
                                             float scale_log2) {
  constexpr int kLds = Tile<D>::kLds;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float sc[2][4] = {};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const uint16_t* kr = ks + (nt * 8 + g) * kLds + kk * 16 + 2 * t;
      MmaOp<T>::run(sc[nt], qf[kk], *reinterpret_cast<const uint32_t*>(kr),
                    *reinterpret_cast<const uint32_t*>(kr + 8));
    }
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = c + nt * 8 + 2 * t + (i & 1);
      sc[nt][i] = key < end ? sc[nt][i] * scale_log2 : -INFINITY;
      mx[i >> 1] = fmaxf(mx[i >> 1], sc[nt][i]);
    }
  }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    // Key c < end is valid, so mx is finite for every row: no inf - inf.
    const float m_new = fmaxf(st.m[r], mx[r]);
    alpha[r] = fast_exp2(st.m[r] - m_new);
    st.m[r] = m_new;
    st.l[r] *= alpha[r];
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sc[nt][i] = fast_exp2(sc[nt][i] - st.m[i >> 1]);
      st.l[i >> 1] += sc[nt][i];
    }
  }
  // The S accumulator layout of two n8 tiles is the A layout of one k16 step.
  const uint32_t pa[4] = {MmaOp<T>::pack(sc[0][0], sc[0][1]), MmaOp<T>::pack(sc[0][2], sc[0][3]),
                          MmaOp<T>::pack(sc[1][0], sc[1][1]), MmaOp<T>::pack(sc[1][2], sc[1][3])};
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    st.o[j][0] *= alpha[0];
    st.o[j][1] *= alpha[0];
    st.o[j][2] *= alpha[1];
    st.o[j][3] *= alpha[1];
    const uint16_t* vcol = vs + 8 * j + g;
    const uint32_t b0 = pack16(vcol[(2 * t) * kLds], vcol[(2 * t + 1) * kLds]);
    const uint32_t b1 = pack16(vcol[(2 * t + 8) * kLds], vcol[(2 * t + 9) * kLds]);
    MmaOp<T>::run(st.o[j], pa, b0, b1);
  }
}

// A fragments of the 16-row query tile (rows past L are zero).
template <int D>
__device__ __forceinline__ void load_q(const DecodeParams& p, int b, int h, int qt,
                                       uint32_t (&qf)[D / 16][4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint16_t* qb = reinterpret_cast<const uint16_t*>(p.q) + b * p.q_sb + h * p.q_sh;
  const int r0 = qt * 16 + g, r1 = r0 + 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int col = kk * 16 + 2 * t;
    auto ld = [&](int r, int cc) -> uint32_t {
      return r < p.L ? *reinterpret_cast<const uint32_t*>(qb + r * p.q_ss + cc) : 0u;
    };
    qf[kk][0] = ld(r0, col);
    qf[kk][1] = ld(r1, col);
    qf[kk][2] = ld(r0, col + 8);
    qf[kk][3] = ld(r1, col + 8);
  }
}

template <typename T, int D>
__device__ __forceinline__ void store_state(float* sm, const WarpState<D>& st) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  float* sm_m = sm;
  float* sm_l = sm + kWarps * 16;
  float* sm_o = sm + 2 * kWarps * 16;
  float l0 = st.l[0], l1 = st.l[1];
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  if (t == 0) {
    sm_m[warp * 16 + g] = st.m[0];
    sm_m[warp * 16 + g + 8] = st.m[1];
    sm_l[warp * 16 + g] = l0;
    sm_l[warp * 16 + g + 8] = l1;
  }
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    const int col = 8 * j + 2 * t;
    sm_o[(warp * 16 + g) * D + col] = st.o[j][0];
    sm_o[(warp * 16 + g) * D + col + 1] = st.o[j][1];
    sm_o[(warp * 16 + g + 8) * D + col] = st.o[j][2];
    sm_o[(warp * 16 + g + 8) * D + col + 1] = st.o[j][3];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_mma_kernel(const DecodeParams p) {
  __shared__ __align__(16) unsigned char smem[Tile<D>::kSmemBytes];
  const int split = blockIdx.x, h = blockIdx.y / p.qtiles, qt = blockIdx.y % p.qtiles;
  const int b = blockIdx.z, warp = threadIdx.x >> 5;
  const int s = clamp_len(p.seq_lens[b], p.M);
  const int n = min(s + p.L, p.M);
  if (p.has_new && split == 0 && qt == 0) append_block(p, b, h, s, D * 2, 2);

  int start, end;
  split_range(n, p.num_splits, split, start, end);
  uint32_t qf[D / 16][4];
  load_q<D>(p, b, h, qt, qf);
  WarpState<D> st;
#pragma unroll
  for (int j = 0; j < D / 8; ++j) st.o[j][0] = st.o[j][1] = st.o[j][2] = st.o[j][3] = 0.f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.f;

  const char* kc = p.kc + (b * p.kc_sb + h * p.kc_sh) * 2;
  const char* vc = p.vc + (b * p.vc_sb + h * p.vc_sh) * 2;
  const char* kn = p.has_new ? p.kn + (b * p.kn_sb + h * p.kn_sh) * 2 : nullptr;
  const char* vn = p.has_new ? p.vn + (b * p.vn_sb + h * p.vn_sh) * 2 : nullptr;
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem) + warp * Tile<D>::kStageHalves;
  uint16_t* vs = ks + kChunk * Tile<D>::kLds;
  uint4 kr[Tile<D>::kVecPerLane], vr[Tile<D>::kVecPerLane];
  int c = start + warp * kChunk;
  if (c < end) load_chunk<D>(p, kc, vc, kn, vn, s, c, end, kr, vr);
  for (; c < end; c += kWarps * kChunk) {
    __syncwarp();  // the previous chunk's fragment reads are done before overwriting
    store_chunk<D>(ks, vs, kr, vr);
    __syncwarp();
    // Prefetch the next chunk while this one is on the tensor cores.
    if (c + kWarps * kChunk < end) load_chunk<D>(p, kc, vc, kn, vn, s, c + kWarps * kChunk, end, kr, vr);
    attend_chunk<T, D>(st, qf, ks, vs, c, end, p.scale_log2);
  }
  __syncthreads();  // staging memory is reused for the merge
  float* sm = reinterpret_cast<float*>(smem);
  store_state<T, D>(sm, st);
  __syncthreads();
  cta_finish<T, D, 16>(p, sm, b, h, qt, split);
}

template <typename T, int D>
void launch_typed(const DecodeParams& p, int batch, cudaStream_t stream) {
  dim3 grid(p.num_splits, p.H * p.qtiles, batch);
  decode_mma_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace

void launch_decode_mma(const DecodeArgs& a, void* stream) {
  const DecodeParams p = make_params(a, (a.L + 15) / 16);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const bool bf = a.dtype == kBFloat16;
  switch (a.head_dim) {
    case 64: bf ? launch_typed<__nv_bfloat16, 64>(p, a.batch, st) : launch_typed<__half, 64>(p, a.batch, st); break;
    case 96: bf ? launch_typed<__nv_bfloat16, 96>(p, a.batch, st) : launch_typed<__half, 96>(p, a.batch, st); break;
    case 128: bf ? launch_typed<__nv_bfloat16, 128>(p, a.batch, st) : launch_typed<__half, 128>(p, a.batch, st); break;
    default: throw std::invalid_argument("head_dim: the CUDA decode kernel supports 64, 96, 128");
  }
  check_launch("block_decode_attention (mma)");
}

}  // namespace nbp
