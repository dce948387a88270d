"""``kv_append_`` (in-place block append): every usable backend vs growing the cache with torch.cat.

    pytest benchmarks/bench_kv_append.py --benchmark-only

L new keys/values per sequence written at ``seq_lens[b]`` of a static
[B, H, M, D] cache, on the backends ``torch``, ``reference``, ``triton`` and
``cuda`` (GPU only), next to ``torch.cat`` growth (what a cache without room
pays: it copies the whole past). Bytes: the new block read and written
(``torch_cat`` moves more, so its ratio shows what the copy costs).
"""
import pytest
import torch

import nbp_kernels
from suite import DEVICE, DTYPE, attention_shape, backend_skip_reason, nbytes, record, run

SHAPE = attention_shape()
IMPLS = ["torch", "reference", "triton", "cuda", "torch_cat"]


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_append_(benchmark, floors, impl):
    batch = SHAPE.decode_batches[-1]
    H, L, D, S = SHAPE.heads, SHAPE.block, SHAPE.head_dim, SHAPE.seq
    benchmark.group = f"kv_append_ {SHAPE.describe(batch)} {DTYPE}"
    g = torch.Generator(DEVICE).manual_seed(0)
    kn, vn = (torch.randn(batch, H, L, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(2))
    kc, vc = (torch.randn(batch, H, S + L, D, device=DEVICE, dtype=DTYPE, generator=g) for _ in range(2))
    lens = torch.full((batch,), S, dtype=torch.int32, device=DEVICE)
    if impl == "torch_cat":
        def fn():
            return torch.cat([kc[:, :, :S], kn], 2), torch.cat([vc[:, :, :S], vn], 2)
    else:
        why = backend_skip_reason(impl, "kv_append_")
        if why:
            pytest.skip(why)

        def fn():
            nbp_kernels.kv_append_(kc, vc, kn, vn, lens, backend=impl, check_bounds=False)
    run(benchmark, fn, 50)
    record(benchmark, floors, op="kv_append_", impl=impl, shape=SHAPE.describe(batch), dtype=DTYPE,
           nbytes=2 * nbytes(kn, vn), flops=0, batch=batch)
