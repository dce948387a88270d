"""The Triton ops as ``torch.library`` custom ops: registration, torch.compile, CUDA graphs.

``opcheck`` verifies each op's schema (declared mutations), fake kernel and
autograd registration; a compiled function (fullgraph) must give the eager
result; on CUDA a captured decode step must replay with new lengths.
"""
import pytest
import torch

import nbp_kernels.ops  # noqa: F401  (registers the nbp:: ops)
from nbp_kernels import reference
from nbp_kernels.registry import backend_status
from nbp_kernels.ops import block_causal_attention, block_decode_attention, kv_append_

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_OK, _WHY = backend_status("triton", DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unusable: {_WHY}")


def _rand(*shape, seed=0, grad=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return t.requires_grad_(grad)


def _decode_args(B=2, H=2, L=4, M=24, D=64):
    q, kc, vc = _rand(B, H, L, D, seed=1), _rand(B, H, M, D, seed=2), _rand(B, H, M, D, seed=3)
    kn, vn = _rand(B, H, L, D, seed=4), _rand(B, H, L, D, seed=5)
    return q, kc, vc, torch.tensor([3, 17][:B], dtype=torch.int32, device=DEVICE), kn, vn


def test_opcheck_attention():
    q, k, v = (_rand(1, 2, 19, 96, seed=s, grad=True) for s in range(3))
    torch.library.opcheck(torch.ops.nbp.block_causal_attention_fwd.default, (q, k, v, 4, 3, True, 0.125))
    do, o, lse = _rand(1, 2, 19, 96, seed=9), *torch.ops.nbp.block_causal_attention_fwd(
        q.detach(), k.detach(), v.detach(), 4, 3, True, 0.125)
    torch.library.opcheck(torch.ops.nbp.block_causal_attention_bwd.default,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, 4, 3, True, 0.125))


def test_opcheck_decode_and_append():
    q, kc, vc, sl, kn, vn = _decode_args()
    torch.library.opcheck(torch.ops.nbp.block_decode_attention.default, (q, kc, vc, sl, 0.125, 2))
    torch.library.opcheck(torch.ops.nbp.block_decode_attention_append_.default,
                          (q, kc, vc, sl, kn, vn, 0.125, 2))
    torch.library.opcheck(torch.ops.nbp.kv_append_.default, (kc, vc, kn, vn, sl))


def test_torch_compile_fullgraph():
    """Attention (forward + backward) and a decode step with append compile without graph breaks."""
    q, k, v = (_rand(1, 2, 21, 64, seed=s, grad=True) for s in range(3))

    def train_step(q, k, v):
        return block_causal_attention(q, k, v, block_size=4, cond_len=2).square().sum()

    compiled = torch.compile(train_step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(train_step(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    def step(q, kc, vc, sl, kn, vn):
        out = block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn)
        kv_append_(kc, vc, kn, vn, sl + q.shape[2])
        return out

    q, kc, vc, sl, kn, vn = _decode_args()
    kc2, vc2 = kc.clone(), vc.clone()
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, kc, vc, sl, kn, vn)
    want = step(q, kc2, vc2, sl, kn, vn)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.skipif(not CUDA, reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_decode_replay():
    """A captured fused decode step replays correctly after seq_lens changes in place."""
    q, kc, vc, sl, kn, vn = _decode_args(B=2, H=4, L=16, M=600, D=96)
    block_decode_attention(q, kc.clone(), vc.clone(), sl, k_new=kn, v_new=vn)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn)
    for lens in ([0, 100], [500, 584]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        want_k, want_v = kc.clone(), vc.clone()
        want = reference.block_decode_attention(q, want_k, want_v, sl, k_new=kn, v_new=vn)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.skipif(not CUDA, reason="inductor with Triton needs a CUDA device")
def test_inductor_compile_cuda():
    q, k, v = (_rand(2, 4, 300, 96, seed=s).to(torch.bfloat16) for s in range(3))

    def f(q, k, v):
        return block_causal_attention(q * 2, k, v, block_size=16, cond_len=5) + 1

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))
