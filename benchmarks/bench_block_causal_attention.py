"""``block_causal_attention`` (NBP prefill): every usable backend next to the torch reference.

    pytest benchmarks/bench_block_causal_attention.py --benchmark-only

Forward, and forward + backward, of one [1, H, S, D] sequence under the NBP
mask (a condition prefix on CPU), on the backends ``torch``, ``reference`` and
``triton`` (CUDA only: on CPU it would run in the interpreter), next to SDPA
with a dense boolean mask and FlexAttention with a block mask (CUDA only).
Bytes: q, k, v read and o written (+ dO read, dq/dk/dv written backward);
FLOPs: 4 D per visible (query, key) pair forward, 3.5x that forward+backward.
"""
import pytest
import torch
import torch.nn.functional as F

import nbp_kernels
from attention_impls import nbp_mask_mod, visible_pairs
from suite import DEVICE, DTYPE, attention_shape, backend_skip_reason, record, run, smoke

SHAPE = attention_shape()
IMPLS = ["torch", "reference", "triton", "sdpa_dense_mask", "flex_block_mask"]


def _inputs(grad: bool):
    g = torch.Generator(DEVICE).manual_seed(0)
    return [torch.randn(1, SHAPE.heads, SHAPE.seq, SHAPE.head_dim, device=DEVICE, dtype=DTYPE,
                        generator=g).requires_grad_(grad) for _ in range(3)]


def _flex(q, k, v):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        pytest.skip(f"FlexAttention unavailable: {e}")
    if DEVICE.type != "cuda":
        pytest.skip("FlexAttention on CPU runs unfused (eager) or needs a long inductor C++ build")
    mask = create_block_mask(nbp_mask_mod(SHAPE.block, SHAPE.cond, False), None, None, SHAPE.seq,
                             SHAPE.seq, device=str(DEVICE))
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda: fn(q, k, v, block_mask=mask)


def _impl(name: str, q, k, v):
    """A zero-argument call of implementation ``name`` on q, k, v (skips if unusable here)."""
    kw = dict(block_size=SHAPE.block, cond_len=SHAPE.cond)
    if name == "sdpa_dense_mask":
        mask = nbp_kernels.nbp_mask(SHAPE.seq, device=DEVICE, **kw)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name == "flex_block_mask":
        return _flex(q, k, v)
    why = backend_skip_reason(name, "block_causal_attention")
    if why:
        pytest.skip(why)
    return lambda: nbp_kernels.block_causal_attention(q, k, v, backend=name, **kw)


def _work(backward: bool) -> tuple[int, int]:
    """(bytes, FLOPs) of one call."""
    tensor = SHAPE.heads * SHAPE.seq * SHAPE.head_dim * torch.finfo(DTYPE).bits // 8
    flops = 4 * SHAPE.head_dim * SHAPE.heads * visible_pairs(SHAPE.seq, SHAPE.block, SHAPE.cond)
    return (12 if backward else 4) * tensor, int(flops * (3.5 if backward else 1))


@pytest.mark.parametrize("impl", IMPLS)
def test_block_causal_attention_forward(benchmark, floors, impl):
    benchmark.group = f"block_causal_attention fwd {SHAPE.describe(1)} {DTYPE}"
    fn = _impl(impl, *_inputs(grad=False))
    run(benchmark, fn, 10)
    nbytes, flops = _work(backward=False)
    record(benchmark, floors, op="block_causal_attention", impl=impl, shape=SHAPE.describe(1), dtype=DTYPE,
           nbytes=nbytes, flops=flops, direction="forward")


@pytest.mark.parametrize("impl", IMPLS)
def test_block_causal_attention_forward_backward(benchmark, floors, impl):
    benchmark.group = f"block_causal_attention fwd+bwd {SHAPE.describe(1)} {DTYPE}"
    q, k, v = _inputs(grad=True)
    fwd = _impl(impl, q, k, v)

    def step():
        o = fwd()
        torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    run(benchmark, step, 5)
    nbytes, flops = _work(backward=True)
    record(benchmark, floors, op="block_causal_attention", impl=impl, shape=SHAPE.describe(1), dtype=DTYPE,
           nbytes=nbytes, flops=flops, direction="forward+backward")


# The CPU prefill of the K600 frame-prediction shape: 512 given tokens in blocks of 16,
# 6 heads x 64, no condition prefix (smoke: 64 tokens). The ``cpu`` backend runs whole
# blocks through the decode-attention kernel; ``torch`` runs SDPA over chunks of rows.
def _cpu_prefill_shape() -> tuple[int, int, int, int]:
    return (2, 64, 32, 16) if smoke() else (6, 512, 64, 16)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_block_causal_attention_cpu_prefill(benchmark, floors, impl):
    if DEVICE.type != "cpu":
        pytest.skip("the CPU prefill shape")
    why = backend_skip_reason(impl, "block_causal_attention")
    if why:
        pytest.skip(why)
    H, S, D, L = _cpu_prefill_shape()
    benchmark.group = f"block_causal_attention CPU prefill [1, {H}, {S}, {D}] L={L}"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, S, D, generator=g) for _ in range(3))
    run(benchmark, lambda: nbp_kernels.block_causal_attention(q, k, v, block_size=L,
                                                              backend=impl), 20)
    record(benchmark, floors, op="block_causal_attention", impl=impl, shape=(1, H, S, D),
           dtype=torch.float32, nbytes=4 * 4 * H * S * D,
           flops=4 * D * H * visible_pairs(S, L), direction="forward")
