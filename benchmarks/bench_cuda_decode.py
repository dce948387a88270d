"""pytest-benchmark: the decode step on the ``cuda`` backend vs ``triton`` and ``torch`` (GPU only).

700M shape: 16 queries, 1280 cached, 16 heads x 96, bf16, batch 1 and 8,
fused append + attend, eager calls on one cache (at batch 1 it stays in L2, so
these are launch-bound, L2-warm numbers). ``benchmarks/tune_decode.py`` gives
the reference table: graph replays over caches that stream from HBM,
FlexAttention, and the bandwidth floor.

    python -m pytest benchmarks/bench_cuda_decode.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

import nbp_kernels
from nbp_kernels.registry import backend_status

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_decode_step(benchmark, backend, batch):
    ok, why = backend_status(backend, "cuda")
    if not ok:
        pytest.skip(f"backend {backend} unusable: {why}")
    H, L, D, cached = 16, 16, 96, 1280
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16)
    q, kn, vn = mk(batch, H, L, D), mk(batch, H, L, D), mk(batch, H, L, D)
    kc, vc = mk(batch, H, cached + L, D), mk(batch, H, cached + L, D)
    lens = torch.full((batch,), cached, dtype=torch.int32, device="cuda")

    def step():
        out = nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn, backend=backend,
                                                 check_bounds=False)
        torch.cuda.synchronize()
        return out

    out = benchmark(step)
    assert out.shape == (batch, H, L, D) and torch.isfinite(out.float()).all()
