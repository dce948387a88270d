"""``block_decode_attention`` (one decode step, fused append): every usable backend vs SDPA.

    pytest benchmarks/bench_block_decode_attention.py --benchmark-only

L new queries per sequence against ``seq`` cached positions, the new block's
keys/values appended in place in the same call (``k_new``/``v_new``), on the
backends ``torch``, ``reference``, ``triton``, ``cuda`` (GPU only) and ``cpu``
(CPU only: the C kernel), next to SDPA over the sliced cache (no append). Eager
calls on one cache: on a GPU at batch 1 the cache stays in L2, so these are
launch-bound, L2-warm numbers (``benchmarks/tune_decode.py`` times graph replays
from HBM). Bytes: the cached positions read once, the new block read and
written, q read, out written; FLOPs: 4 D per (query, visible key) pair.

``test_block_decode_attention_k600_cpu``: the CPU decode step of the K600 model
(6 heads x 64, blocks of 16, a 1280-position cache holding 900), ``torch`` and
``cpu`` side by side, q/k/v as the model passes them (head views of one
[B, L, 3 H D] tensor); each call takes the next of 6 layers' caches, so, as in a
decode step, the cache is not the one the previous call just read.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import nbp_kernels
from suite import DEVICE, DTYPE, attention_shape, backend_skip_reason, nbytes, record, run

SHAPE = attention_shape()
IMPLS = ["torch", "reference", "triton", "cuda", "cpu", "sdpa_sliced_cache"]


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
        why = backend_skip_reason(impl, "block_decode_attention") or _cpu_only(impl)
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


def _cpu_only(impl: str) -> str | None:
    if impl == "cpu" and DEVICE.type != "cpu":
        return "the cpu backend runs CPU tensors only"
    return None


# K600 on the CPU: heads, head_dim, block, cache positions, cached before the block, layers
K600 = dict(H=6, D=64, L=16, M=1280, seq=900, layers=6)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the K600 CPU decode shape is a CPU benchmark")
@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_block_decode_attention_k600_cpu(benchmark, floors, impl):
    H, D, L, M, S = K600["H"], K600["D"], K600["L"], K600["M"], K600["seq"]
    shape = f"B1 H{H} S{S} D{D} L{L} M{M} (K600 CPU decode)"
    benchmark.group = f"block_decode_attention {shape} float32"
    why = backend_skip_reason(impl, "block_decode_attention")
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, L, 3, H, D, generator=g)
    q, kn, vn = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    caches = itertools.cycle([(torch.randn(1, H, M, D, generator=g)[:, :, :S + L],
                               torch.randn(1, H, M, D, generator=g)[:, :, :S + L])
                              for _ in range(K600["layers"])])
    lens = torch.full((1,), S, dtype=torch.int32)

    def fn():
        kc, vc = next(caches)
        return nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn, backend=impl,
                                                  check_bounds=False)
    run(benchmark, fn, 60)
    moved = 2 * (S * H * D * 4) + 2 * nbytes(kn, vn) + 2 * nbytes(q)
    record(benchmark, floors, op="block_decode_attention", impl=impl, shape=shape, dtype=torch.float32,
           nbytes=moved, flops=4 * H * L * (S + L) * D, batch=1, threads=torch.get_num_threads())
