"""Triton block decode attention (split-KV, fused append) against nbp_kernels.reference.

Checks the output, that the caches equal a clone with only the new block
written (nothing else touched), per-sequence lengths, independence from the
split count, and that nothing is written at or beyond max_seq.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nbp_kernels
from nbp_kernels import reference
from nbp_kernels.registry import backend_status
from nbp_kernels.ops import block_decode_attention as triton_decode

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_OK, _WHY = backend_status("triton", DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unusable: {_WHY}")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]

# (B, H, L, M, D): L in {1, 8, 16, 64}, odd cache sizes, head_dim 96 (+ 64, 128).
CPU_CASES = [(3, 2, 1, 37, 96), (2, 1, 8, 45, 96), (2, 2, 16, 53, 64), (1, 1, 64, 90, 128),
             (2, 1, 5, 29, 96)]
GPU_CASES = [(1, 16, 16, 1296, 96), (8, 16, 16, 1296, 96), (3, 4, 1, 2049, 128), (2, 8, 64, 777, 64),
             (2, 4, 256, 1500, 96), (4, 2, 8, 333, 96)]
CASES = GPU_CASES if CUDA else CPU_CASES


def _setup(B, H, L, M, D, dtype, new_dtype=None, seed=0, lens=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(DEVICE, dt)

    q, kc, vc = rnd(B, H, L, D), rnd(B, H, M, D), rnd(B, H, M, D)
    kn, vn = rnd(B, H, L, D, dt=new_dtype or dtype), rnd(B, H, L, D, dt=new_dtype or dtype)
    if lens is None:  # spread over [0, M - L], ends included
        lens = torch.linspace(0, M - L, B).round().int().tolist()[::-1]
    return q, kc, vc, kn, vn, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def _close(got, want, tol, what):
    err = (got.float() - want.float()).abs().max().item()
    bound = tol * max(1.0, want.float().abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _check(case, dtype, append=True, num_splits=None, new_dtype=None, seed=0, lens=None):
    q, kc, vc, kn, vn, sl = _setup(*case, dtype, new_dtype, seed, lens)
    if not append:
        kn = vn = None
    want_k, want_v = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, want_k, want_v, sl, k_new=kn, v_new=vn)
    if num_splits is None:
        out = nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn, backend="triton")
    else:
        out = triton_decode(q, kc, vc, sl, k_new=kn, v_new=vn, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, want, TOL[dtype], "out")
    # The whole caches equal a clone with only the block written: nothing else changed.
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}L{}M{}D{}".format(*c))
def test_matches_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "B{}H{}L{}M{}D{}".format(*c))
def test_without_new_block(case):
    _check(case, torch.float32, append=False)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_split_counts_agree(num_splits):
    """Every split count gives the reference result (the reduction is exact up to rounding)."""
    _check(CASES[1], torch.float32, num_splits=num_splits, seed=num_splits)


@pytest.mark.skipif(not CUDA, reason="fp16/bf16 kernels need a GPU (the interpreter runs fp32 only here)")
def test_bf16_cache_fp16_queries():
    """Queries in another dtype than the cache: the output follows q, the cache keeps its dtype."""
    q, kc, vc, kn, vn, sl = _setup(2, 4, 16, 300, 96, torch.bfloat16, seed=5)
    q = q.half()
    want_k, want_v = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, want_k, want_v, sl, k_new=kn, v_new=vn)
    out = nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn, backend="triton")
    assert out.dtype == torch.float16
    _close(out, want, TOL[torch.bfloat16], "out")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_new_block_cast_to_cache_dtype():
    """fp16 new keys go into an fp32 cache; attention sees the cache's (rounded) values."""
    _check(CASES[0], torch.float32, new_dtype=torch.float16)


def test_single_sequence_lengths_edge():
    """Empty cache (seq_len 0) and a cache filled up to max_seq exactly."""
    B, H, L, M, D = 2, 1, 8, 40, 96
    _check((B, H, L, M, D), torch.float32, lens=[0, M - L], num_splits=3)


def test_no_write_at_or_beyond_max_seq():
    """With the host check skipped, an overflowing block is clipped at max_seq.

    The cache is a slice of a larger buffer, so a stray write past max_seq
    would land in the buffer's tail, which must stay untouched.
    """
    B, H, L, M, D = 2, 1, 8, 20, 64
    q, kc, vc, kn, vn, _ = _setup(B, H, L, M, D, torch.float32)
    kbuf, vbuf = torch.zeros(B, H, M + 16, D, device=DEVICE), torch.zeros(B, H, M + 16, D, device=DEVICE)
    sl = torch.tensor([M - 3, 2], dtype=torch.int32, device=DEVICE)
    nbp_kernels.block_decode_attention(q, kbuf[:, :, :M], vbuf[:, :, :M], sl, k_new=kn, v_new=vn,
                                       backend="triton", check_bounds=False)
    assert not kbuf[:, :, M:].any() and not vbuf[:, :, M:].any()
    assert torch.equal(kbuf[0, :, M - 3:M], kn[0, :, :3]) and torch.equal(kbuf[1, :, 2:2 + L], kn[1])


@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 3), L=st.sampled_from([1, 3, 8, 16]), extra=st.integers(0, 40),
       D=st.sampled_from([64, 96]), splits=st.integers(0, 4), append=st.booleans(),
       seed=st.integers(0, 1000))
def test_random_shapes(B, L, extra, D, splits, append, seed):
    M = L + extra
    lens = torch.randint(0, M - L + 1, (B,), generator=torch.Generator().manual_seed(seed)).tolist()
    _check((B, 1, L, M, D), torch.float32, append=append, num_splits=splits, seed=seed, lens=lens)


def test_bad_inputs_raise():
    q, kc, vc, kn, vn, sl = _setup(1, 1, 4, 10, 64, torch.float32)
    with pytest.raises(ValueError, match="cache overflow"):
        nbp_kernels.block_decode_attention(q, kc, vc, sl + 8, k_new=kn, v_new=vn, backend="triton")
    with pytest.raises(ValueError, match="seq_lens"):
        nbp_kernels.block_decode_attention(q, kc, vc, sl.long(), backend="triton")
    with pytest.raises(ValueError, match="k_new, v_new"):
        nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, backend="triton")
    with pytest.raises(ValueError, match="num_splits"):
        triton_decode(q, kc, vc, sl, num_splits=-1)
    big = torch.zeros(1, 1, 4, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        nbp_kernels.block_decode_attention(big, torch.zeros(1, 1, 10, 512, device=DEVICE),
                                           torch.zeros(1, 1, 10, 512, device=DEVICE), sl,
                                           backend="triton")
