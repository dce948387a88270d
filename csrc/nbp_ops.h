// Host-side interface between bindings.cpp (pybind11, host compiler) and the
// CUDA translation units (nvcc). Deliberately free of CUDA and torch headers so
// the binding layer compiles with any host compiler and the module does not
// depend on the torch C++ ABI.
#pragma once
#include <cstdint>

namespace nbp {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A [batch, heads, seq, head_dim] tensor whose last dimension has stride 1.
// Strides are in elements.
struct View {
  void* ptr = nullptr;
  int64_t sb = 0, sh = 0, ss = 0;
};

struct DecodeArgs {
  View q, k_cache, v_cache, k_new, v_new, out;
  const int32_t* seq_lens = nullptr;  // device, [batch]
  int batch = 0, heads = 0, L = 0, max_seq = 0, head_dim = 0;
  int dtype = kBFloat16;
  bool has_new = false;
  float scale = 0.f;
  int num_splits = 1;
  float* part_o = nullptr;    // [batch, heads, L, num_splits, head_dim] fp32, unused if num_splits == 1
  float* part_lse = nullptr;  // [batch, heads, L, num_splits] fp32
};

struct AppendArgs {
  View k_cache, v_cache, k_new, v_new;
  const int32_t* seq_lens = nullptr;
  int batch = 0, heads = 0, L = 0, max_seq = 0, head_dim = 0;
  int elem_bytes = 2;
};

constexpr int kMaxSplits = 64;
constexpr int kMaxBlockSize = 256;

// Launchers: arguments are assumed validated (bindings.cpp); they throw
// std::runtime_error if the launch itself fails.
void launch_decode(const DecodeArgs& a, void* stream);
void launch_append(const AppendArgs& a, void* stream);

// Number of KV splits for a decode step of this shape (host-only, no CUDA call).
int decode_num_splits(int batch, int heads, int L, int max_seq, int head_dim, int dtype, int num_sms);

// Compiled-in description (set by setup.py through -DNBP_ARCHS=...).
const char* compiled_archs();
int cuda_runtime_version_compiled();

}  // namespace nbp
