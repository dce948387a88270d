// kv_append_: copy the new block of every (batch, head) into both caches at
// seq_lens[b] (read on the device), never past max_seq. Pure data movement in
// 16-byte vectors, so one kernel serves every dtype.
#include "common.cuh"

namespace nbp {
namespace {

struct AppendParams {
  char* kc; int64_t kc_sb, kc_sh, kc_ss;
  char* vc; int64_t vc_sb, vc_sh, vc_ss;
  const char* kn; int64_t kn_sb, kn_sh, kn_ss;
  const char* vn; int64_t vn_sb, vn_sh, vn_ss;
  const int32_t* seq_lens;
  int H, L, M, vec_per_row, elem;
};

__global__ void __launch_bounds__(256) kv_append_kernel(const AppendParams p, int64_t total) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int v = (int)(i % p.vec_per_row);
  int64_t row = i / p.vec_per_row;  // (b * H + h) * L + l
  const int l = (int)(row % p.L);
  row /= p.L;
  const int h = (int)(row % p.H), b = (int)(row / p.H);
  const int s = p.seq_lens[b];
  if (s < 0 || s + l >= p.M) return;  // unchecked overflow writes nothing
  const int e = p.elem;
  const char* ks = p.kn + (b * p.kn_sb + h * p.kn_sh + l * p.kn_ss) * e;
  const char* vs = p.vn + (b * p.vn_sb + h * p.vn_sh + l * p.vn_ss) * e;
  char* kd = p.kc + (b * p.kc_sb + h * p.kc_sh + (int64_t)(s + l) * p.kc_ss) * e;
  char* vd = p.vc + (b * p.vc_sb + h * p.vc_sh + (int64_t)(s + l) * p.vc_ss) * e;
  reinterpret_cast<uint4*>(kd)[v] = reinterpret_cast<const uint4*>(ks)[v];
  reinterpret_cast<uint4*>(vd)[v] = reinterpret_cast<const uint4*>(vs)[v];
}

}  // namespace

void launch_append(const AppendArgs& a, void* stream) {
  AppendParams p{};
  set_cache_io(p, a);
  p.elem = a.elem_bytes;
  p.vec_per_row = a.head_dim * a.elem_bytes / 16;
  const int64_t total = (int64_t)a.batch * a.heads * a.L * p.vec_per_row;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  kv_append_kernel<<<(unsigned)blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p, total);
  check_launch("kv_append_");
}

}  // namespace nbp
