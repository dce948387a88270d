"""The ``cuda`` backend against ``nbp_kernels.reference`` (GPU only).

Covers bf16/fp16/fp32, head_dim 64/96/128, L in {1, 16} plus generic L (one
partial tile, several tiles), odd and per-sequence lengths (including 0 and a
full cache), split and unsplit KV, strided inputs, and whole-cache
comparisons (nothing outside the appended block changes, nothing past
max_seq is written).
"""
from __future__ import annotations

import pytest
import torch

import nbp_kernels
from nbp_kernels import cuda_ops, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

def _ids(d):
    return str(d).replace("torch.", "")


TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)}


@pytest.fixture(scope="module", autouse=True)
def _backend_usable():
    ok, why = cuda_ops.is_available(torch.device("cuda"))
    assert ok, f"a CUDA device is present but the cuda backend is unusable: {why}"


def _case(B, H, L, D, M, lens, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda", dtype=torch.float32).to(dtype)
    q, kn, vn = r(B, H, L, D), r(B, H, L, D), r(B, H, L, D)
    kc, vc = r(B, H, M, D), r(B, H, M, D)
    return q, kc, vc, kn, vn, torch.tensor(lens, dtype=torch.int32, device="cuda")


def _check_decode(q, kc, vc, kn, vn, lens, scale=None):
    rk, rv = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, rk, rv, lens, k_new=kn, v_new=vn, scale=scale)
    got = nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn, scale=scale,
                                             backend="cuda")
    atol, rtol = TOL[q.dtype]
    assert got.shape == want.shape and got.dtype == q.dtype
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    assert torch.equal(kc, rk) and torch.equal(vc, rv), "caches differ from the reference append"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=_ids)
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("L", [1, 16, 5, 40])
@pytest.mark.parametrize("fused", [True, False])
def test_decode_matches_reference(dtype, D, L, fused):
    M = 601
    lens = [0, 37, M - L]  # empty prefix, odd length, cache filled to the last slot
    q, kc, vc, kn, vn, lens = _case(3, 4, L, D, M, lens, dtype)
    if fused:
        _check_decode(q, kc, vc, kn, vn, lens)
    else:
        nbp_kernels.kv_append_(kc, vc, kn, vn, lens, backend="torch")
        want = reference.block_decode_attention(q, kc, vc, lens)
        got = nbp_kernels.block_decode_attention(q, kc, vc, lens, backend="cuda")
        torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_ids)
@pytest.mark.parametrize("B, H, M, lens", [
    (1, 16, 1296, [1280]),           # the 700M shape at batch 1: many splits
    (8, 16, 1296, [1280, 1, 640, 999, 0, 1279, 77, 1024]),
    (2, 3, 100, [50, 84]),           # too short to split: single-pass path
    (1, 2, 4099, [4000]),            # long sequence, few heads: 33 splits
])
def test_decode_split_shapes(dtype, B, H, M, lens):
    q, kc, vc, kn, vn, lens = _case(B, H, 16, 96, M, lens, dtype, seed=1)
    _check_decode(q, kc, vc, kn, vn, lens)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_ids)
@pytest.mark.parametrize("splits", [1, 2, 7, 64])
def test_decode_forced_split_counts(dtype, splits):
    """Any split count gives the same answer, including splits left empty by a short sequence."""
    q, kc, vc, kn, vn, lens = _case(2, 3, 16, 96, 700, [650, 13], dtype, seed=6)
    rk, rv = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, rk, rv, lens, k_new=kn, v_new=vn)
    got = torch.ops.nbp.cuda_block_decode_attention(q, kc, vc, lens, kn, vn, 96 ** -0.5, splits)
    torch.testing.assert_close(got, want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


def test_decode_custom_scale_and_strided_inputs():
    B, H, L, D, M = 2, 4, 16, 128, 300
    lens = torch.tensor([123, 7], dtype=torch.int32, device="cuda")
    # q, k_new as views of a fused [B, L, 3, H, D] projection; caches as slices of a longer buffer.
    qkv = torch.randn(B, L, 3, H, D, device="cuda").to(torch.bfloat16)
    q, kn, vn = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    kbuf, vbuf = torch.randn(2, B, H, M + 16, D, device="cuda").to(torch.bfloat16)
    kc, vc = kbuf[:, :, :M], vbuf[:, :, :M]
    tail_k, tail_v = kbuf[:, :, M:].clone(), vbuf[:, :, M:].clone()
    _check_decode(q, kc, vc, kn, vn, lens, scale=0.37)
    assert torch.equal(kbuf[:, :, M:], tail_k) and torch.equal(vbuf[:, :, M:], tail_v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=_ids)
@pytest.mark.parametrize("L", [1, 16, 7, 300])
def test_kv_append_matches_reference(dtype, L):
    M = 333 + L
    _, kc, vc, kn, vn, lens = _case(3, 5, L, 96, M, [0, 101, M - L], dtype, seed=3)
    rk, rv = kc.clone(), vc.clone()
    reference.kv_append_(rk, rv, kn, vn, lens)
    nbp_kernels.kv_append_(kc, vc, kn, vn, lens, backend="cuda")
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


def test_overflow_raises_before_writing():
    q, kc, vc, kn, vn, lens = _case(2, 2, 16, 64, 64, [10, 49], torch.bfloat16)
    before = kc.clone()
    with pytest.raises(ValueError, match="cache overflow"):
        nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn, backend="cuda")
    with pytest.raises(ValueError, match="cache overflow"):
        nbp_kernels.kv_append_(kc, vc, kn, vn, lens, backend="cuda")
    assert torch.equal(kc, before)


def test_unchecked_overflow_never_writes_past_max_seq():
    B, H, L, D, M = 1, 2, 16, 64, 40
    kbuf = torch.zeros(B, H, M + 16, D, device="cuda", dtype=torch.bfloat16)
    vbuf = torch.zeros_like(kbuf)
    kc, vc = kbuf[:, :, :M], vbuf[:, :, :M]
    q, _, _, kn, vn, lens = _case(B, H, L, D, M, [30], torch.bfloat16)
    out = nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn, backend="cuda",
                                             check_bounds=False)
    assert torch.isfinite(out.float()).all()
    assert torch.equal(kc[:, :, 30:], kn[:, :, :M - 30]) and torch.equal(vc[:, :, 30:], vn[:, :, :M - 30])
    assert not kbuf[:, :, M:].any() and not vbuf[:, :, M:].any()
    nbp_kernels.kv_append_(kc, vc, kn, vn, lens, backend="cuda", check_bounds=False)
    assert not kbuf[:, :, M:].any() and not vbuf[:, :, M:].any()


def test_deterministic():
    q, kc, vc, kn, vn, lens = _case(4, 8, 16, 96, 700, [699 - 16, 5, 300, 411], torch.bfloat16)
    a = nbp_kernels.block_decode_attention(q, kc.clone(), vc.clone(), lens, k_new=kn, v_new=vn, backend="cuda")
    b = nbp_kernels.block_decode_attention(q, kc.clone(), vc.clone(), lens, k_new=kn, v_new=vn, backend="cuda")
    assert torch.equal(a, b)


def test_cuda_graph_capture_and_replay():
    B, H, L, D, M = 2, 4, 16, 96, 256
    q, kc, vc, kn, vn, lens = _case(B, H, L, D, M, [20, 100], torch.bfloat16, seed=4)
    rk, rv = kc.clone(), vc.clone()
    step = lambda: nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn,
                                                      backend="cuda", check_bounds=False)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up loads the kernels outside the capture (and appends at [20, 100])
    torch.cuda.current_stream().wait_stream(s)
    reference.kv_append_(rk, rv, kn, vn, lens)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new_lens in ([36, 116], [52, 132]):  # seq_lens changes between replays, no re-capture
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        want = reference.block_decode_attention(q, rk, rv, lens, k_new=kn, v_new=vn)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    assert torch.equal(kc, rk) and torch.equal(vc, rv)


def test_torch_compile_fullgraph():
    q, kc, vc, kn, vn, lens = _case(2, 4, 16, 64, 128, [3, 90], torch.float16, seed=5)
    rk, rv = kc.clone(), vc.clone()
    fn = torch.compile(lambda *a: cuda_ops.block_decode_attention(*a[:4], k_new=a[4], v_new=a[5]),
                       fullgraph=True)
    got = fn(q, kc, vc, lens, kn, vn)
    want = reference.block_decode_attention(q, rk, rv, lens, k_new=kn, v_new=vn)
    torch.testing.assert_close(got, want, atol=3e-3, rtol=3e-3)
    assert torch.equal(kc, rk)
