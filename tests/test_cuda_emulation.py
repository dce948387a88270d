"""The CUDA kernels' own sources, run on the CPU under an emulation of the CUDA execution model.

No GPU is needed: ``csrc/*.cu`` is compiled with the host compiler against a
shim in which every CTA runs as real threads (``__syncthreads`` /
``__syncwarp`` are barriers, ``__shfl_xor_sync`` a warp exchange, shared
memory is per-CTA), ``mma.sync.m16n8k16`` is computed warp-collectively from
the PTX ISA fragment layouts, and ``ex2.approx`` is ``exp2f``. Everything else
(split ranges, fragment indexing, staging, the fused append, the per-warp and
per-split merges, the boundary checks in bindings.cpp) is the shipped code,
checked against ``nbp_kernels.reference``. It cannot see what only hardware
shows (timing, real races, the exact ex2 rounding): tests/test_cuda_ops.py
does that on a GPU.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from nbp_kernels import reference
from nbp_kernels._tiles import strides3 as _strides
from nbp_kernels.cuda_ops import DTYPE_CODES, _kernel_ready

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_INCLUDE = next((p / "include" for p in [Path("/usr/local/cuda"), *sorted(Path("/usr/local").glob("cuda-*"))]
                     if (p / "include" / "cuda_bf16.h").exists()), None)
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}

SHIM = r"""
// CPU emulation of the CUDA execution model for the nbp kernels (test harness only).
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __log2f log2f
#define cudaGetLastError() cudaSuccess
#define cudaGetErrorString(e) "emulated"

inline thread_local dim3 emu_threadIdx, emu_blockIdx;
inline dim3 emu_blockDim, emu_gridDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim

using std::min;
using std::max;

struct EmuCta {
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> xchg;            // [warp][32]
  std::vector<uint32_t> a, b;         // mma operands [warp][32][4], [warp][32][2]
  std::vector<float> c;               // [warp][32][4]
  explicit EmuCta(int n) : all(n) {
    int nw = (n + 31) / 32;
    for (int w = 0; w < nw; ++w) warps.emplace_back(new std::barrier<>(std::min(32, n - 32 * w)));
    xchg.resize(nw * 32); a.resize(nw * 128); b.resize(nw * 64); c.resize(nw * 128);
  }
};
inline EmuCta* g_cta = nullptr;

inline int emu_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }
inline void __syncthreads() { g_cta->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_cta->warps[emu_tid() / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  int t = emu_tid(), w = t / 32, l = t % 32;
  g_cta->xchg[w * 32 + l] = v;
  __syncwarp();
  float r = g_cta->xchg[w * 32 + (l ^ m)];
  __syncwarp();
  return r;
}

template <typename T> inline float emu_elem(uint32_t reg, int hi) {
  uint16_t bits = hi ? (reg >> 16) : (reg & 0xffff);
  T x; std::memcpy(&x, &bits, 2);
  if constexpr (std::is_same_v<T, __half>) return __half2float(x); else return __bfloat162float(x);
}

// m16n8k16 row.col with the PTX ISA fragment layouts, computed warp-collectively.
template <typename T>
inline void emu_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  int t = emu_tid(), w = t / 32, l = t % 32;
  for (int j = 0; j < 4; ++j) { g_cta->a[w * 128 + l * 4 + j] = a[j]; g_cta->c[w * 128 + l * 4 + j] = c[j]; }
  g_cta->b[w * 64 + l * 2] = b0; g_cta->b[w * 64 + l * 2 + 1] = b1;
  __syncwarp();
  float A[16][16], B[16][8], C[16][8];
  for (int ln = 0; ln < 32; ++ln) {
    int g = ln >> 2, tg = ln & 3;
    for (int i = 0; i < 8; ++i) {   // a_i: register i / 2, half i % 2
      int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      int col = tg * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = emu_elem<T>(g_cta->a[w * 128 + ln * 4 + i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) {
      int row = tg * 2 + (i & 1) + (i >= 2 ? 8 : 0);
      B[row][g] = emu_elem<T>(g_cta->b[w * 64 + ln * 2 + i / 2], i % 2);
    }
    for (int i = 0; i < 4; ++i) C[g + (i >= 2 ? 8 : 0)][tg * 2 + (i & 1)] = g_cta->c[w * 128 + ln * 4 + i];
  }
  __syncwarp();
  int g = l >> 2, tg = l & 3;
  for (int i = 0; i < 4; ++i) {
    int row = g + (i >= 2 ? 8 : 0), col = tg * 2 + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[i] = acc;
  }
}

template <typename K>
inline auto emu_launch(K kernel, dim3 grid, dim3 block, int, cudaStream_t) {
  return [=](auto... args) {
    emu_gridDim = grid; emu_blockDim = block;
    const int n = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
      EmuCta cta(n);
      g_cta = &cta;
      std::vector<std::thread> th;
      for (int t = 0; t < n; ++t) th.emplace_back([&, t] {
        emu_blockIdx = dim3(x, y, z);
        emu_threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        kernel(args...);
      });
      for (auto& h : th) h.join();
    }
  };
}
#define EMU_LAUNCH(k, ...) emu_launch(k, __VA_ARGS__)
"""


def _rewrite(name: str, text: str) -> str:
    """A csrc file with its inline PTX replaced by the shim and launches made emulated calls."""
    if name == "common.cuh":
        text = text.replace('asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));', "y = exp2f(x);")
        assert "exp2f(x)" in text, "common.cuh: fast_exp2 changed; update the emulation"
    if name == "decode_mma.cu":
        parts = re.split(r"asm volatile\(.*?\);", text, flags=re.S)
        assert len(parts) == 3, "decode_mma.cu: expected two mma asm blocks (bf16, fp16)"
        text = (parts[0] + "emu_mma<__nv_bfloat16>(c, a, b0, b1);" + parts[1]
                + "emu_mma<__half>(c, a, b0, b1);" + parts[2])
    text = re.sub(r"(\w+(?:<[^<>]*>)?)<<<(.*?)>>>", r"EMU_LAUNCH((\1), \2)", text)
    return '#include "shim.h"\n' + text if name.endswith(".cu") else text


def _build(out: Path) -> Path:
    import pybind11

    (out / "shim.h").write_text(SHIM)
    for f in CSRC.iterdir():
        (out / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)).write_text(_rewrite(f.name, f.read_text()))
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = [f"-I{out}", f"-I{CUDA_INCLUDE}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    jobs = []
    for f in CSRC.iterdir():
        if f.suffix in (".cu", ".cpp"):
            std = "-std=c++17" if f.suffix == ".cpp" else "-std=c++20"
            src = out / (f.stem + ".cpp")
            jobs.append([cxx, std, "-O1", "-fPIC", '-DNBP_ARCHS="emulated"', *inc, "-c", str(src),
                         "-o", str(out / (f.stem + ".o"))])
    with ThreadPoolExecutor(2) as pool:
        for r in pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs):
            assert r.returncode == 0, r.stderr[-3000:]
    so = out / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run([cxx, "-shared", *map(str, out.glob("*.o")), "-lpthread", "-o", str(so)], check=True)
    return so


@pytest.fixture(scope="module")
def E(tmp_path_factory):
    if shutil.which("g++") is None or CUDA_INCLUDE is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_bf16.h) to compile the emulation")
    pytest.importorskip("pybind11")
    so = _build(tmp_path_factory.mktemp("cuda_emu"))
    spec = importlib.util.spec_from_file_location("_C", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decode(E, q, kc, vc, lens, kn, vn, scale, splits=0):
    """What cuda_ops does, on CPU tensors; split workspaces start as NaN so unwritten parts show."""
    B, H, L, D = q.shape
    M = kc.shape[2]
    q = _kernel_ready(q)
    kn, vn = (None if t is None else _kernel_ready(t) for t in (kn, vn))
    out = torch.empty(B, H, L, D, dtype=q.dtype)
    S = splits or E.num_splits(B, H, L, M, D, DTYPE_CODES[q.dtype], 2)
    rows = B * H * L * S
    po = torch.full((rows * D if S > 1 else 0,), float("nan"))
    pl = torch.full((rows if S > 1 else 0,), float("nan"))
    ptr = lambda t: 0 if t is None else t.data_ptr()
    st = lambda t: (0, 0, 0) if t is None else _strides(t)
    E.decode(q.data_ptr(), st(q), kc.data_ptr(), st(kc), vc.data_ptr(), st(vc), ptr(kn), st(kn), ptr(vn), st(vn),
             out.data_ptr(), st(out), lens.data_ptr(), B, H, L, M, D, DTYPE_CODES[q.dtype], scale, S,
             po.data_ptr() if S > 1 else 0, po.numel(), pl.data_ptr() if S > 1 else 0, pl.numel(), 0)
    return out


def _case(B, H, L, D, M, lens, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)
    return r(B, H, L, D), r(B, H, M, D), r(B, H, M, D), r(B, H, L, D), r(B, H, L, D), torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype, D, L, fused, splits", [
    (torch.bfloat16, 96, 16, True, 0), (torch.bfloat16, 64, 1, True, 3), (torch.bfloat16, 128, 20, False, 2),
    (torch.float16, 96, 5, True, 1), (torch.float16, 64, 16, False, 3),
    (torch.float32, 96, 1, True, 3), (torch.float32, 128, 16, True, 1), (torch.float32, 64, 20, False, 2),
], ids=lambda v: str(v).replace("torch.", ""))
def test_decode_matches_reference(E, dtype, D, L, fused, splits):
    M = 131
    q, kc, vc, kn, vn, lens = _case(2, 2, L, D, M, [0, M - L - 3], dtype, seed=D + L)
    if not fused:
        reference.kv_append_(kc, vc, kn, vn, lens)
        kn = vn = None
    rk, rv = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, rk, rv, lens, k_new=kn, v_new=vn, scale=D ** -0.5)
    got = _decode(E, q, kc, vc, lens, kn, vn, D ** -0.5, splits)
    torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


@pytest.mark.parametrize("dtype, L, splits", [(torch.bfloat16, 40, 64), (torch.float32, 1, 64), (torch.float16, 16, 7)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_decode_many_mostly_empty_splits(E, dtype, L, splits):
    q, kc, vc, kn, vn, lens = _case(2, 1, L, 96, 200, [200 - L, 11], dtype, seed=splits)
    rk, rv = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, rk, rv, lens, k_new=kn, v_new=vn)
    got = _decode(E, q, kc, vc, lens, kn, vn, 96 ** -0.5, splits)
    torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


def test_decode_strided_inputs_and_cache_tail_untouched(E):
    B, H, L, D, M = 2, 2, 16, 128, 90
    qkv = torch.randn(B, L, 3, H, D).to(torch.bfloat16)
    q, kn, vn = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    kbuf, vbuf = torch.randn(2, B, H, M + 16, D).to(torch.bfloat16)
    kc, vc = kbuf[:, :, :M], vbuf[:, :, :M]
    tail_k, tail_v = kbuf[:, :, M:].clone(), vbuf[:, :, M:].clone()
    lens = torch.tensor([57, 3], dtype=torch.int32)
    rk, rv = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, rk, rv, lens, k_new=kn, v_new=vn, scale=0.37)
    got = _decode(E, q, kc, vc, lens, kn, vn, 0.37, 2)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
    assert torch.equal(kbuf[:, :, M:], tail_k) and torch.equal(vbuf[:, :, M:], tail_v)


def test_unchecked_overflow_is_clamped_to_max_seq(E):
    B, H, L, D, M = 1, 2, 16, 64, 40
    kbuf = torch.zeros(B, H, M + 16, D, dtype=torch.bfloat16)
    vbuf = torch.zeros_like(kbuf)
    kc, vc = kbuf[:, :, :M], vbuf[:, :, :M]
    q, _, _, kn, vn, lens = _case(B, H, L, D, M, [30], torch.bfloat16)
    out = _decode(E, q, kc, vc, lens, kn, vn, 0.125)
    assert torch.isfinite(out.float()).all()
    assert torch.equal(kc[:, :, 30:], kn[:, :, :M - 30]) and torch.equal(vc[:, :, 30:], vn[:, :, :M - 30])
    assert not kbuf[:, :, M:].any() and not vbuf[:, :, M:].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("L", [1, 7, 300])
def test_append_matches_reference(E, dtype, L):
    M = 40 + L
    _, kc, vc, kn, vn, lens = _case(2, 3, L, 96, M, [0, M - L], dtype)
    rk, rv = kc.clone(), vc.clone()
    reference.kv_append_(rk, rv, kn, vn, lens)
    E.append(kc.data_ptr(), _strides(kc), vc.data_ptr(), _strides(vc), kn.data_ptr(), _strides(kn),
             vn.data_ptr(), _strides(vn), lens.data_ptr(), 2, 3, L, M, 96, DTYPE_CODES[dtype], 0)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)
