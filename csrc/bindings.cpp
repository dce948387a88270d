// pybind11 module nbp_kernels._C: raw device pointers (Python ints), shapes,
// strides (elements) and the CUDA stream handle in; no torch headers, so the
// module is independent of the torch C++ ABI. Every argument is checked here,
// before any CUDA call; violations raise ValueError (std::invalid_argument).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <climits>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "nbp_ops.h"

namespace py = pybind11;
using Strides = std::array<int64_t, 3>;  // (batch, heads, seq); head_dim stride is 1

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

int elem_bytes(int dtype) {
  switch (dtype) {
    case nbp::kFloat32: return 4;
    case nbp::kFloat16: case nbp::kBFloat16: return 2;
    default: fail("dtype: expected 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  }
}

nbp::View view(const char* name, uintptr_t ptr, const Strides& st, int elem) {
  if (ptr == 0) fail(std::string(name) + ": null data pointer");
  if (ptr % 16 != 0) fail(std::string(name) + ": data pointer must be 16-byte aligned");
  const char* dims[3] = {"batch", "heads", "seq"};
  for (int i = 0; i < 3; ++i) {
    if (st[i] < 0 || (st[i] * elem) % 16 != 0) {
      std::ostringstream os;
      os << name << ": the " << dims[i] << " stride must be a non-negative multiple of 16 bytes ("
         << 16 / elem << " elements), got " << st[i];
      fail(os.str());
    }
  }
  nbp::View v;
  v.ptr = reinterpret_cast<void*>(ptr);
  v.sb = st[0]; v.sh = st[1]; v.ss = st[2];
  return v;
}

void check_shape(int batch, int heads, int L, int max_seq, int head_dim, int max_L) {
  if (batch < 1 || batch > 65535) fail("batch: expected 1..65535, got " + std::to_string(batch));
  if (heads < 1 || heads > 4096) fail("heads: expected 1..4096, got " + std::to_string(heads));
  if (L < 1 || L > max_L)
    fail("L: block length must be in 1.." + std::to_string(max_L) + ", got " + std::to_string(L));
  if (max_seq < L) fail("max_seq: must be >= L (" + std::to_string(L) + "), got " + std::to_string(max_seq));
  if ((int64_t)batch * heads * L > INT32_MAX)
    fail("batch * heads * L: must be < 2^31 (one CUDA grid), got " + std::to_string((int64_t)batch * heads * L));
  if (head_dim < 1) fail("head_dim: must be positive, got " + std::to_string(head_dim));
}

void check_seq_lens(uintptr_t ptr) {
  if (ptr == 0 || ptr % 4 != 0) fail("seq_lens: expected a non-null, 4-byte aligned int32 device pointer");
}

void decode(uintptr_t q, Strides q_st, uintptr_t k_cache, Strides kc_st, uintptr_t v_cache,
            Strides vc_st, uintptr_t k_new, Strides kn_st, uintptr_t v_new, Strides vn_st,
            uintptr_t out, Strides out_st, uintptr_t seq_lens, int batch, int heads, int L,
            int max_seq, int head_dim, int dtype, double scale, int num_splits, uintptr_t part_o,
            int64_t part_o_numel, uintptr_t part_lse, int64_t part_lse_numel, uintptr_t stream) {
  const int elem = elem_bytes(dtype);
  check_shape(batch, heads, L, max_seq, head_dim, nbp::kMaxBlockSize);
  if (head_dim != 64 && head_dim != 96 && head_dim != 128)
    fail("head_dim: the CUDA decode kernel supports 64, 96, 128, got " + std::to_string(head_dim));
  if (!std::isfinite(scale)) fail("scale: expected a finite number");
  if ((int64_t)heads * ((L + 15) / 16) > 65535) fail("heads * ceil(L / 16): must be <= 65535");
  nbp::DecodeArgs a;
  a.q = view("q", q, q_st, elem);
  a.k_cache = view("k_cache", k_cache, kc_st, elem);
  a.v_cache = view("v_cache", v_cache, vc_st, elem);
  a.out = view("out", out, out_st, elem);
  if ((k_new == 0) != (v_new == 0)) fail("k_new, v_new: pass both or neither");
  a.has_new = k_new != 0;
  if (a.has_new) {
    a.k_new = view("k_new", k_new, kn_st, elem);
    a.v_new = view("v_new", v_new, vn_st, elem);
  }
  check_seq_lens(seq_lens);
  if (num_splits < 1 || num_splits > nbp::kMaxSplits)
    fail("num_splits: expected 1.." + std::to_string(nbp::kMaxSplits) + ", got " + std::to_string(num_splits));
  const int64_t rows = (int64_t)batch * heads * L * num_splits;
  if (num_splits > 1) {
    if (part_o == 0 || part_o % 16 != 0 || part_o_numel < rows * head_dim)
      fail("part_o: expected a 16-byte aligned fp32 workspace of at least " + std::to_string(rows * head_dim) +
           " elements, got " + std::to_string(part_o_numel));
    if (part_lse == 0 || part_lse % 4 != 0 || part_lse_numel < rows)
      fail("part_lse: expected an fp32 workspace of at least " + std::to_string(rows) + " elements, got " +
           std::to_string(part_lse_numel));
  }
  a.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
  a.batch = batch; a.heads = heads; a.L = L; a.max_seq = max_seq; a.head_dim = head_dim;
  a.dtype = dtype; a.scale = (float)scale; a.num_splits = num_splits;
  a.part_o = reinterpret_cast<float*>(part_o);
  a.part_lse = reinterpret_cast<float*>(part_lse);
  py::gil_scoped_release nogil;
  nbp::launch_decode(a, reinterpret_cast<void*>(stream));
}

void append(uintptr_t k_cache, Strides kc_st, uintptr_t v_cache, Strides vc_st, uintptr_t k_new,
            Strides kn_st, uintptr_t v_new, Strides vn_st, uintptr_t seq_lens, int batch, int heads,
            int L, int max_seq, int head_dim, int dtype, uintptr_t stream) {
  const int elem = elem_bytes(dtype);
  check_shape(batch, heads, L, max_seq, head_dim, 1 << 24);
  if ((head_dim * elem) % 16 != 0)
    fail("head_dim: a row must be a multiple of 16 bytes, got " + std::to_string(head_dim) + " x " +
         std::to_string(elem) + " bytes");
  nbp::AppendArgs a;
  a.k_cache = view("k_cache", k_cache, kc_st, elem);
  a.v_cache = view("v_cache", v_cache, vc_st, elem);
  a.k_new = view("k_new", k_new, kn_st, elem);
  a.v_new = view("v_new", v_new, vn_st, elem);
  check_seq_lens(seq_lens);
  a.seq_lens = reinterpret_cast<const int32_t*>(seq_lens);
  a.batch = batch; a.heads = heads; a.L = L; a.max_seq = max_seq; a.head_dim = head_dim;
  a.elem_bytes = elem;
  py::gil_scoped_release nogil;
  nbp::launch_append(a, reinterpret_cast<void*>(stream));
}

py::dict build_info() {
  py::dict d;
  py::list archs;
  std::string s = nbp::compiled_archs();
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t next = s.find(';', pos);
    const std::string item = s.substr(pos, next == std::string::npos ? std::string::npos : next - pos);
    if (!item.empty()) archs.append(item);
    if (next == std::string::npos) break;
    pos = next + 1;
  }
  d["archs"] = archs;
  const int v = nbp::cuda_runtime_version_compiled();
  d["cuda_runtime"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  d["max_splits"] = nbp::kMaxSplits;
  d["max_block_size"] = nbp::kMaxBlockSize;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nbp CUDA kernels (decode attention with fused KV append, kv_append_)";
  m.def("decode", &decode,
        "Split-KV decode attention; pointers are device addresses, strides in elements.",
        py::arg("q"), py::arg("q_strides"), py::arg("k_cache"), py::arg("k_cache_strides"),
        py::arg("v_cache"), py::arg("v_cache_strides"), py::arg("k_new"), py::arg("k_new_strides"),
        py::arg("v_new"), py::arg("v_new_strides"), py::arg("out"), py::arg("out_strides"),
        py::arg("seq_lens"), py::arg("batch"), py::arg("heads"), py::arg("L"), py::arg("max_seq"),
        py::arg("head_dim"), py::arg("dtype"), py::arg("scale"), py::arg("num_splits"),
        py::arg("part_o"), py::arg("part_o_numel"), py::arg("part_lse"), py::arg("part_lse_numel"),
        py::arg("stream"));
  m.def("append", &append, "In-place block append into both caches at seq_lens[b].",
        py::arg("k_cache"), py::arg("k_cache_strides"), py::arg("v_cache"), py::arg("v_cache_strides"),
        py::arg("k_new"), py::arg("k_new_strides"), py::arg("v_new"), py::arg("v_new_strides"),
        py::arg("seq_lens"), py::arg("batch"), py::arg("heads"), py::arg("L"), py::arg("max_seq"),
        py::arg("head_dim"), py::arg("dtype"), py::arg("stream"));
  m.def("num_splits", &nbp::decode_num_splits, "KV splits for a decode step of this shape.",
        py::arg("batch"), py::arg("heads"), py::arg("L"), py::arg("max_seq"), py::arg("head_dim"),
        py::arg("dtype"), py::arg("num_sms"));
  m.def("build_info", &build_info, "Compiled archs and CUDA runtime version.");
}
