"""Triton block-causal attention (forward + backward) against nbp_kernels.reference.

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes are tiny and dtype fp32. With CUDA the same
tests run at larger shapes in fp32, fp16 and bf16 (benchmarks/gpu_check.sh).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nbp_kernels
from nbp_kernels import reference
from nbp_kernels.registry import backend_status

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_OK, _WHY = backend_status("triton", DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unusable: {_WHY}")

# (forward, gradient) tolerances, relative to the reference's max magnitude.
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 6e-2)}
# GPU runs keep the (dtype, head_dim, hybrid) combinations few: each one is a Triton compile.
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]

# (B, H, S, D, block_size, cond_len, hybrid): odd S, S not a multiple of the
# block, condition prefixes, hybrid layout, block longer than S, all-condition.
CPU_CASES = [
    (1, 2, 37, 96, 5, 3, False),
    (2, 1, 33, 96, 16, 7, True),
    (1, 1, 40, 96, 8, 0, False),
    (1, 1, 23, 64, 1, 0, False),
    (1, 1, 20, 128, 64, 4, False),
    (1, 1, 19, 64, 16, 0, True),
    (1, 1, 1, 96, 16, 0, False),
    (1, 1, 17, 96, 4, 17, False),
]
GPU_CASES = [
    (2, 4, 1283, 96, 16, 5, False),
    (1, 4, 1280, 128, 16, 0, False),
    (2, 2, 777, 64, 1, 0, False),
    (1, 3, 1001, 96, 256, 1, True),
    (2, 2, 300, 96, 16, 12, True),
    (1, 2, 129, 96, 64, 129, False),
]
CASES = GPU_CASES if CUDA else CPU_CASES


def _inputs(B, H, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def _close(got, want, tol, what):
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _check(B, H, S, D, bs, cond, hybrid, dtype, grads=True, scale=None, seed=0):
    q, k, v = _inputs(B, H, S, D, dtype, seed)
    kw = dict(block_size=bs, cond_len=cond, hybrid=hybrid, scale=scale)
    out = nbp_kernels.block_causal_attention(q, k, v, backend="triton", **kw)
    assert out.shape == q.shape and out.dtype == dtype
    want = reference.block_causal_attention(q, k, v, **kw)
    fwd_tol, grad_tol = TOL[dtype]
    _close(out, want, fwd_tol, "out")
    if not grads:
        return
    do = torch.randn_like(out)
    got_g = torch.autograd.grad(out, (q, k, v), do)
    want_g = torch.autograd.grad(want.float(), (q, k, v), do.float())
    for name, a, b in zip("qkv", got_g, want_g):
        assert a.dtype == dtype
        _close(a, b, grad_tol, f"d{name}")


def _case_id(c):
    return "B{}H{}S{}D{}L{}c{}{}".format(*c[:6], "h" if c[6] else "")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_reference(case, dtype):
    _check(*case, dtype=dtype)


@pytest.mark.skipif(not CUDA, reason="fp16 kernels need a GPU (the interpreter runs fp32 only here)")
def test_fp16():
    _check(2, 2, 515, 96, 16, 3, False, torch.float16)


def test_custom_scale_and_head_dims():
    for D in (64, 128, 48):
        _check(1, 1, 18, D, 4, 2, False, torch.float32, scale=0.3, seed=D)


def test_strided_inputs():
    """[B, S, H, D] activations viewed as [B, H, S, D] run without a copy and match."""
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(1, 21, 2, 96, generator=g).to(DEVICE) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in x)
    assert not q.is_contiguous()
    kw = dict(block_size=4, cond_len=2, hybrid=False)
    out = nbp_kernels.block_causal_attention(q, k, v, backend="triton", **kw)
    _close(out, reference.block_causal_attention(q, k, v, **kw), TOL[torch.float32][0], "out")


def test_mask_semantics_pinned():
    """The kernel's block structure: a query's output depends only on the keys its mask shows.

    Changing a key that row 5 may not see (block 2 with block_size 3) leaves
    row 5 unchanged; changing one it may see changes it.
    """
    q, k, v = (t.detach() for t in _inputs(1, 1, 12, 64, torch.float32, seed=7))
    kw = dict(block_size=3, backend="triton")
    base = nbp_kernels.block_causal_attention(q, k, v, **kw)[0, 0, 5]
    v_hidden, v_seen = v.clone(), v.clone()
    v_hidden[0, 0, 6] += 10.0
    v_seen[0, 0, 4] += 10.0
    assert torch.equal(nbp_kernels.block_causal_attention(q, k, v_hidden, **kw)[0, 0, 5], base)
    assert not torch.allclose(nbp_kernels.block_causal_attention(q, k, v_seen, **kw)[0, 0, 5], base)


@settings(max_examples=6, deadline=None)
@given(S=st.integers(1, 40), D=st.sampled_from([64, 96]), bs=st.integers(1, 20),
       cond_frac=st.floats(0.0, 1.0), hybrid=st.booleans(), seed=st.integers(0, 1000))
def test_random_shapes(S, D, bs, cond_frac, hybrid, seed):
    _check(1, 1, S, D, bs, int(cond_frac * S), hybrid, torch.float32, grads=seed % 2 == 0, seed=seed)


@pytest.mark.parametrize("bad, match", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=4, cond_len=99), "cond_len"),
    (dict(block_size=4, k_shape=(1, 1, 9, 64)), "k: expected the same shape"),
    (dict(block_size=4, dtype=torch.int32), "q: expected dtype"),
    (dict(block_size=4, head_dim=320), "head_dim"),
])
def test_bad_inputs_raise(bad, match):
    dtype = bad.get("dtype", torch.float32)
    D = bad.get("head_dim", 64)
    q = torch.ones(1, 1, 8, D, device=DEVICE).to(dtype)
    k = torch.ones(bad.get("k_shape", (1, 1, 8, D)), device=DEVICE).to(dtype)
    with pytest.raises(ValueError, match=match):
        nbp_kernels.block_causal_attention(q, k, q, block_size=bad["block_size"],
                                           cond_len=bad.get("cond_len", 0), backend="triton")
