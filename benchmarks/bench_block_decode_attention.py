"""``block_decode_attention`` (one decode step, fused append): every usable backend vs SDPA.

    pytest benchmarks/bench_block_decode_attention.py --benchmark-only

L new queries per sequence against ``seq`` cached positions, the new block's
keys/values appended in place in the same call (``k_new``/``v_new``), on the
backends ``torch``, ``reference``, ``triton`` and ``cuda`` (GPU only), next to
SDPA over the sliced cache (no append). Eager calls on one cache: on a GPU at
batch 1 the cache stays in L2, so these are launch-bound, L2-warm numbers
(``benchmarks/tune_decode.py`` times graph replays from HBM). Bytes: the
cached positions read once, the new block read and written, q read, out written; FLOPs:
4 D per (query, visible key) pair.
"""
import pytest
import torch
import torch.nn.functional as F

import nbp_kernels
from suite import DEVICE, DTYPE, attention_shape, backend_skip_reason, nbytes, record, run

SHAPE = attention_shape()
IMPLS = ["torch", "reference", "triton", "cuda", "sdpa_sliced_cache"]


def _inputs(batch: int):
    g = torch.Generator(DEVICE).manual_seed(0)
    H, L, D, S = SHAPE.heads, SHAPE.block, SHAPE.head_dim, SHAPE.seq
    mk = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, generator=g)  # noqa: E731
    q, kn, vn = mk(batch, H, L, D), mk(batch, H, L, D), mk(batch, H, L, D)
    kc, vc = mk(batch, H, S + L, D), mk(batch, H, S + L, D)
    return q, kc, vc, torch.full((batch,), S, dtype=torch.int32, device=DEVICE), kn, vn


@pytest.mark.parametrize("batch", SHAPE.decode_batches)
@pytest.mark.parametrize("impl", IMPLS)
def test_block_decode_attention_fused_append(benchmark, floors, impl, batch):
    benchmark.group = f"block_decode_attention {SHAPE.describe(batch)} {DTYPE}"
    q, kc, vc, lens, kn, vn = _inputs(batch)
    visible = SHAPE.seq + SHAPE.block
    if impl == "sdpa_sliced_cache":
        fn = lambda: F.scaled_dot_product_attention(q, kc[:, :, :visible], vc[:, :, :visible])  # noqa: E731
    else:
        why = backend_skip_reason(impl, "block_decode_attention")
        if why:
            pytest.skip(why)

        def fn():
            return nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn, backend=impl,
                                                      check_bounds=False)
    run(benchmark, fn, 20)
    # the cached positions read once, the new block read and written, q read and the output written
    moved = nbytes(kc, vc) * SHAPE.seq // visible + 2 * nbytes(kn, vn) + 2 * nbytes(q)
    record(benchmark, floors, op="block_decode_attention", impl=impl, shape=SHAPE.describe(batch),
           dtype=DTYPE, nbytes=moved,
           flops=4 * batch * SHAPE.heads * SHAPE.block * visible * SHAPE.head_dim, batch=batch)
