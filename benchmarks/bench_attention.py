"""Attention and KV-cache benchmarks (pytest-benchmark).

    pytest benchmarks/bench_attention.py --benchmark-only

Prefill: NBP block-causal attention, Triton vs SDPA with a dense mask vs
FlexAttention with a block mask (and the torch backend). Decode: one step of
L queries against the cache, Triton (with and without the fused append) vs
SDPA over the sliced cache. Append: in-place Triton kernel vs torch scatter vs
torch.cat growth. CUDA runs the 700M shapes (16 heads x 96, S = 1280, L = 16,
bf16); CPU runs small fp32 shapes (Triton and FlexAttention skip there, with
the reason).
"""
import pytest
import torch

from attention_impls import append_impls, decode_impls, prefill_backward_impls, prefill_impls

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
# 700M model: 16 heads x 96, 1280-token sequences, blocks of 16.
HEADS, HEAD_DIM, SEQ, BLOCK = (16, 96, 1280, 16) if CUDA else (4, 64, 256, 16)
DECODE_BATCH = (1, 8) if CUDA else (1, 4)
MAX_SEQ = SEQ + 256

PREFILL = ["triton", "torch", "sdpa_dense_mask", "flex_block_mask"]
DECODE = ["triton_fused_append", "triton", "torch", "sdpa_sliced_cache"]
APPEND = ["triton", "torch_scatter", "torch_cat"]


def _rand(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(grad)


def _run(benchmark, fn):
    if isinstance(fn, str):
        pytest.skip(fn)

    def call():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    call()  # compile / autotune outside the timing
    benchmark(call)


@pytest.mark.parametrize("impl", PREFILL)
def test_prefill_forward(benchmark, impl):
    benchmark.group = f"prefill fwd B1 H{HEADS} S{SEQ} D{HEAD_DIM} L{BLOCK} {DTYPE}"
    q, k, v = (_rand(1, HEADS, SEQ, HEAD_DIM) for _ in range(3))
    _run(benchmark, prefill_impls(q, k, v, block_size=BLOCK)[impl])


@pytest.mark.parametrize("impl", PREFILL)
def test_prefill_forward_backward(benchmark, impl):
    benchmark.group = f"prefill fwd+bwd B1 H{HEADS} S{SEQ} D{HEAD_DIM} L{BLOCK} {DTYPE}"
    q, k, v = (_rand(1, HEADS, SEQ, HEAD_DIM, grad=True) for _ in range(3))
    impls = prefill_backward_impls(q, k, v, block_size=BLOCK)
    _run(benchmark, impls.get(impl, prefill_impls(q, k, v, block_size=BLOCK)[impl]))


@pytest.mark.parametrize("batch", DECODE_BATCH)
@pytest.mark.parametrize("impl", DECODE)
def test_decode_step(benchmark, impl, batch):
    benchmark.group = f"decode B{batch} H{HEADS} L{BLOCK} cached{SEQ} D{HEAD_DIM} {DTYPE}"
    q, kn, vn = (_rand(batch, HEADS, BLOCK, HEAD_DIM) for _ in range(3))
    kc, vc = (_rand(batch, HEADS, MAX_SEQ, HEAD_DIM) for _ in range(2))
    seq_lens = torch.full((batch,), SEQ, dtype=torch.int32, device=DEVICE)
    _run(benchmark, decode_impls(q, kc, vc, seq_lens, kn, vn, SEQ + BLOCK)[impl])


@pytest.mark.parametrize("impl", APPEND)
def test_kv_append(benchmark, impl):
    batch = DECODE_BATCH[-1]
    benchmark.group = f"kv append B{batch} H{HEADS} L{BLOCK} cached{SEQ} D{HEAD_DIM} {DTYPE}"
    kn, vn = (_rand(batch, HEADS, BLOCK, HEAD_DIM) for _ in range(2))
    kc, vc = (_rand(batch, HEADS, MAX_SEQ, HEAD_DIM) for _ in range(2))
    seq_lens = torch.full((batch,), SEQ, dtype=torch.int32, device=DEVICE)
    _run(benchmark, append_impls(kc, vc, kn, vn, seq_lens, SEQ)[impl])
