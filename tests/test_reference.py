"""nbp_kernels.reference: the NBP mask and the reference ops."""
import itertools
import math

import pytest
import torch

import nbp_kernels
from nbp_kernels import reference as ref


def dense_mask(S, L, cond_len, hybrid):
    """The published get_attn_mask, written as loops over rows and blocks."""
    if hybrid:
        m = torch.tril(torch.ones(S, S, dtype=torch.bool))
        m[:, :cond_len] = True
        start = cond_len + L
        for i in range(start, S, L):
            m[i:i + L, start:i + L] = True
        return m
    m = torch.zeros(S, S, dtype=torch.bool)
    m[:, :cond_len] = True
    for i in range(cond_len, S, L):
        m[i:i + L, cond_len:i + L] = True
    return m


LAYOUTS = [(S, L, c, h) for S, L, c, h in itertools.product(
    [1, 7, 16, 33], [1, 3, 4, 16], [0, 1, 5], [False, True]) if c < S]


@pytest.mark.parametrize("S,L,cond_len,hybrid", LAYOUTS)
def test_mask_equals_dense_construction(S, L, cond_len, hybrid):
    got = ref.nbp_mask(S, block_size=L, cond_len=cond_len, hybrid=hybrid)
    assert torch.equal(got, dense_mask(S, L, cond_len, hybrid))


def test_mask_known_small_case():
    # cond 1, L 2, non-hybrid, S 5: rows 1-2 see 0..2, rows 3-4 see 0..4, row 0 sees only 0.
    expect = torch.tensor([[1, 0, 0, 0, 0],
                           [1, 1, 1, 0, 0],
                           [1, 1, 1, 0, 0],
                           [1, 1, 1, 1, 1],
                           [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(ref.nbp_mask(5, block_size=2, cond_len=1), expect)


def test_mask_rows_with_offset_are_a_slice_of_the_full_mask():
    full = ref.nbp_mask(40, block_size=4, cond_len=3, hybrid=True)
    part = ref.nbp_mask(8, 40, block_size=4, cond_len=3, hybrid=True, q_offset=20)
    assert torch.equal(part, full[20:28])


def test_block_ids_hybrid_start_is_causal():
    ids = ref.block_ids(torch.arange(12), block_size=4, cond_len=2, hybrid=True)
    assert ids.tolist() == [-1, -1, 0, 1, 2, 3, 4, 4, 4, 4, 5, 5]


def _naive_attention(q, k, v, mask, scale):
    out = torch.zeros_like(q, dtype=torch.float64)
    for b, h, i in itertools.product(*map(range, q.shape[:3])):
        s = [(q[b, h, i].double() @ k[b, h, j].double()).item() * scale if mask[i, j] else -math.inf
             for j in range(k.shape[2])]
        p = torch.softmax(torch.tensor(s, dtype=torch.float64), 0)
        out[b, h, i] = p @ v[b, h].double()
    return out


@pytest.mark.parametrize("hybrid", [False, True])
def test_block_causal_attention_matches_naive_loops(hybrid):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 8, generator=g) for _ in range(3))
    got = ref.block_causal_attention(q, k, v, block_size=3, cond_len=2, hybrid=hybrid)
    mask = dense_mask(11, 3, 2, hybrid)
    torch.testing.assert_close(got.double(), _naive_attention(q, k, v, mask, 8 ** -0.5),
                               rtol=1e-5, atol=1e-5)


def test_decode_equals_last_rows_of_full_attention():
    """A decode step over a cache equals the last block of full block-causal attention."""
    g = torch.Generator().manual_seed(1)
    B, H, D, L, prefix = 2, 2, 16, 4, 12
    q, k, v = (torch.randn(B, H, prefix + L, D, generator=g) for _ in range(3))
    full = ref.block_causal_attention(q, k, v, block_size=L)
    kc, vc = torch.zeros(B, H, 20, D), torch.zeros(B, H, 20, D)
    kc[:, :, :prefix], vc[:, :, :prefix] = k[:, :, :prefix], v[:, :, :prefix]
    lens = torch.full((B,), prefix, dtype=torch.int32)
    out = ref.block_decode_attention(q[:, :, prefix:], kc, vc, lens,
                                     k_new=k[:, :, prefix:], v_new=v[:, :, prefix:])
    torch.testing.assert_close(out, full[:, :, prefix:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc[:, :, :prefix + L], k)
    assert kc[:, :, prefix + L:].abs().sum() == 0


def test_kv_append_per_sequence_lengths_and_untouched_rest():
    B, H, M, D, L = 3, 2, 10, 4, 3
    kc, vc = torch.randn(B, H, M, D), torch.randn(B, H, M, D)
    k0, v0 = kc.clone(), vc.clone()
    kn, vn = torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    lens = torch.tensor([0, 4, 7], dtype=torch.int32)
    ref.kv_append_(kc, vc, kn, vn, lens)
    for b, s in enumerate(lens.tolist()):
        k0[b, :, s:s + L], v0[b, :, s:s + L] = kn[b], vn[b]
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_reference(dtype):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 13, 96, generator=g).to(dtype).requires_grad_() for _ in range(3))
    kw = dict(block_size=4, cond_len=1, hybrid=True)
    a = nbp_kernels.block_causal_attention(q, k, v, backend="torch", **kw)
    b = ref.block_causal_attention(q, k, v, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(a, b, **tol)
    go = torch.randn_like(a)
    ga = torch.autograd.grad(a, (q, k, v), go)
    gb = torch.autograd.grad(b, (q, k, v), go)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("lens, M", [
    ([0, 5, 12], 17),     # per-row lengths: scatter append, masked attention
    ([6, 6, 6], 17),      # one length, spare cache: slice append, masked attention
    ([12, 12, 12], 17),   # one length filling the cache view exactly: no mask (the generator's case)
    ([12], 17),
])
def test_torch_backend_decode_and_append_match_reference(lens, M):
    g = torch.Generator().manual_seed(3)
    B, H, D, L = len(lens), 2, 8, 5
    kc, vc = torch.randn(B, H, M, D, generator=g), torch.randn(B, H, M, D, generator=g)
    q, kn, vn = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    lens = torch.tensor(lens, dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    a = nbp_kernels.block_decode_attention(q, kc, vc, lens, k_new=kn, v_new=vn, backend="torch")
    b = ref.block_decode_attention(q, kc2, vc2, lens, k_new=kn, v_new=vn)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    nbp_kernels.kv_append_(kc, vc, vn, kn, lens, backend="torch")
    ref.kv_append_(kc2, vc2, vn, kn, lens)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="block_size"):
        nbp_kernels.block_causal_attention(q, q, q, block_size=0)
    with pytest.raises(ValueError, match="cond_len"):
        nbp_kernels.block_causal_attention(q, q, q, block_size=2, cond_len=9)
    with pytest.raises(ValueError, match="k: expected the same shape"):
        nbp_kernels.block_causal_attention(q, q[:, :, :4], q, block_size=2)
    with pytest.raises(ValueError, match="dtype"):
        nbp_kernels.block_causal_attention(q.long(), q.long(), q.long(), block_size=2)
    cache = torch.zeros(1, 2, 10, 16)
    with pytest.raises(ValueError, match="seq_lens: expected dtype"):
        nbp_kernels.kv_append_(cache, cache.clone(), q[:, :, :2], q[:, :, :2], torch.tensor([0]))
    with pytest.raises(ValueError, match="cache overflow"):
        nbp_kernels.kv_append_(cache, cache.clone(), q[:, :, :4], q[:, :, :4],
                               torch.tensor([7], dtype=torch.int32))
    with pytest.raises(ValueError, match="k_cache: expected shape"):
        nbp_kernels.block_decode_attention(q[:, :, :2], torch.zeros(1, 3, 10, 16), cache,
                                           torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        nbp_kernels.block_causal_attention(q, q, q, block_size=2, backend="nope")
