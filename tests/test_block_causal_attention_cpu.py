"""The ``cpu`` backend's block-causal attention (``decode_attention_cpu``: whole blocks through
the decode-attention kernel) against nbp_kernels.reference, on every ISA this CPU runs, and
its fallback to the ``torch`` backend for the layouts the kernel does not take."""
import pytest
import torch

from cpu_isa_paths import ISAS, force_isa
import nbp_kernels
from nbp_kernels import decode_attention_cpu, reference, registry, torch_ops



@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    return force_isa(monkeypatch, request.param, decode_attention_cpu.is_available)


def _qkv(B, H, S, D, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).requires_grad_(grad) for _ in range(3)]


# (B, H, S, D, block_size): the K600 prefill, head_dim 96 (padded rows), odd blocks and
# lengths, one block, a batch of two (one call per sequence)
KERNEL_CASES = [(1, 6, 512, 64, 16), (2, 3, 96, 96, 16), (1, 2, 35, 32, 5), (2, 2, 21, 64, 7),
                (1, 1, 16, 16, 16), (1, 2, 40, 96, 4)]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "B{}H{}S{}D{}L{}".format(*c))
def test_whole_blocks_run_the_kernel_and_match_reference(isa, case, monkeypatch):
    B, H, S, D, L = case
    q, k, v = _qkv(B, H, S, D)
    assert decode_attention_cpu._blocks_take(q, k, v, L, 0, False)
    monkeypatch.setattr(torch_ops, "block_causal_attention", None)   # no fallback taken
    out = decode_attention_cpu.block_causal_attention(q, k, v, block_size=L)
    want = reference.block_causal_attention(q, k, v, block_size=L)
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    # strided inputs (split_heads of a [B, S, H * D] tensor), a scale
    x = torch.randn(3, B, S, H * D)
    q, k, v = (t.view(B, S, H, D).transpose(1, 2) for t in x)
    out = decode_attention_cpu.block_causal_attention(q, k, v, block_size=L, scale=0.3)
    torch.testing.assert_close(out, reference.block_causal_attention(q, k, v, block_size=L,
                                                                     scale=0.3),
                               atol=2e-5, rtol=2e-5)


# (B, H, S, D, block_size, cond_len, hybrid): a condition prefix, hybrid blocks, a last
# partial block, blocks below MIN_ROWS
FALLBACK_CASES = [(1, 2, 37, 32, 16, 0, False), (1, 2, 40, 32, 8, 3, False),
                  (2, 1, 33, 96, 16, 7, True), (1, 1, 24, 16, 2, 0, False)]


@pytest.mark.parametrize("case", FALLBACK_CASES, ids=lambda c: "S{}L{}c{}{}".format(
    c[2], c[4], c[5], "h" if c[6] else ""))
def test_other_layouts_take_the_torch_backend(isa, case):
    B, H, S, D, L, cond, hybrid = case
    q, k, v = _qkv(B, H, S, D, seed=1)
    assert not decode_attention_cpu._blocks_take(q, k, v, L, cond, hybrid)
    kw = dict(block_size=L, cond_len=cond, hybrid=hybrid)
    torch.testing.assert_close(decode_attention_cpu.block_causal_attention(q, k, v, **kw),
                               reference.block_causal_attention(q, k, v, **kw),
                               atol=2e-5, rtol=2e-5)


def test_autograd_takes_the_torch_backend(isa):
    q, k, v = _qkv(1, 2, 32, 16, seed=2, grad=True)
    assert not decode_attention_cpu._blocks_take(q, k, v, 8, 0, False)
    out = decode_attention_cpu.block_causal_attention(q, k, v, block_size=8)
    want = reference.block_causal_attention(q, k, v, block_size=8)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do),
                    torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert decode_attention_cpu._blocks_take(q, k, v, 8, 0, False)


def test_auto_resolves_to_the_cpu_kernel_for_float32(isa):
    fn = registry.resolve("block_causal_attention", "auto", device=torch.device("cpu"),
                          dtype=torch.float32, head_dim=64, block_size=16)
    assert fn is decode_attention_cpu.block_causal_attention
    q, k, v = _qkv(1, 2, 64, 64, seed=3)
    torch.testing.assert_close(nbp_kernels.block_causal_attention(q, k, v, block_size=16),
                               reference.block_causal_attention(q, k, v, block_size=16),
                               atol=2e-5, rtol=2e-5)
