"""GPU first contact: every Triton and CUDA kernel against the reference, in one short file.

Step ``quick_tests`` of ``GPU_CHECK_STEPS=first-contact bash benchmarks/gpu_check.sh``
(at most 90 s on an H100, Triton compiles included): the production tile
sizes (a GPU never runs the interpreter's 16x16), bf16 / fp16 / fp32, head
dims 64 / 96 / 128, odd lengths, a condition prefix, the hybrid layout,
per-row cache lengths, the split and the direct decode variants, and the
prefill kernel's gradients. Each (dtype, head dim, layout) is a Triton
compile, so the cases are few and the production one (bf16, 96) comes first.

On a CPU the same cases run in fp32 at small sizes with Triton in the
interpreter (tests/conftest.py), so the file's logic is checked here; the
cuda backend and fp16/bf16 Triton cases need a GPU and skip.
"""
import pytest
import torch

import nbp_kernels
from nbp_kernels import reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
USABLE = nbp_kernels.available_backends(DEVICE)
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if CUDA else [torch.float32]
# Max abs error relative to the reference's max magnitude: (forward, gradients).
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 2e-2), torch.bfloat16: (2e-2, 6e-2)}

# (B, H, S, D, block_size, cond_len, hybrid); GPU lengths, CPU lengths
PREFILL = [((2, 4, 1283, 96, 16, 5, False), 21),
           ((1, 2, 777, 64, 16, 0, True), 35),
           ((1, 2, 515, 128, 16, 33, False), 41)]
# (B, H, L, D, per-row cached lengths, capacity, fused append); capacity <= 128 -> one split (direct)
DECODE = [((2, 4, 16, 96, (1000, 333), 1040, True), (40, 13), 64),
          ((3, 2, 1, 64, (777, 5, 128), 800, False), (30, 5, 16), 40),
          ((2, 4, 16, 128, (31, 90), 112, True), (31, 20), 48)]


def _rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype)


def _close(got, want, tol, what):
    got, want = got.float(), want.float()
    err = (got - want).abs().max().item()
    bound = tol * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _usable(backend: str, dtype: torch.dtype) -> None:
    if backend not in USABLE:
        pytest.skip(f"backend {backend} unusable on {DEVICE}")
    if not CUDA and dtype != torch.float32:
        pytest.skip("the Triton interpreter runs fp32 only here")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(PREFILL)))
def test_block_causal_attention_triton(case, dtype):
    """Forward on every case; gradients (q, k, v) on the first (the production layout)."""
    _usable("triton", dtype)
    (B, H, S, D, bs, cond, hybrid), cpu_s = PREFILL[case]
    B, H, S = (B, H, S) if CUDA else (1, 1, cpu_s)  # the interpreter's backward is slow
    q, k, v = (_rand(B, H, S, D, dtype=dtype, seed=i).requires_grad_() for i in range(3))
    kw = dict(block_size=bs, cond_len=min(cond, S), hybrid=hybrid)
    out = nbp_kernels.block_causal_attention(q, k, v, backend="triton", **kw)
    assert out.shape == q.shape and out.dtype == dtype
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = reference.block_causal_attention(qf, kf, vf, **kw)
    fwd_tol, grad_tol = TOL[dtype]
    _close(out, want, fwd_tol, "out")
    if case != 0:
        return
    do = _rand(B, H, S, D, dtype=dtype, seed=9)
    got = torch.autograd.grad(out, (q, k, v), do)
    ref = torch.autograd.grad(want, (qf, kf, vf), do.float())
    for name, a, b in zip("qkv", got, ref):
        assert a.dtype == dtype and a.shape == b.shape
        _close(a, b, grad_tol, f"d{name}")


def _decode_inputs(case: int, dtype):
    (B, H, L, D, lens, cap, fused), cpu_lens, cpu_cap = DECODE[case]
    lens, cap = (lens, cap) if CUDA else (cpu_lens, cpu_cap)
    q, kn, vn = (_rand(B, H, L, D, dtype=dtype, seed=i) for i in range(3))
    kc, vc = (_rand(B, H, cap, D, dtype=dtype, seed=3 + i) for i in range(2))
    seq = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, kc, vc, seq, (kn, vn) if fused else (None, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(DECODE)))
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_block_decode_attention(backend, case, dtype):
    """Decode (fused append where the case has one) against the reference; the caches too."""
    _usable(backend, dtype)
    q, kc, vc, seq, (kn, vn) = _decode_inputs(case, dtype)
    ref_k, ref_v = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q.float(), ref_k.float(), ref_v.float(), seq,
                                            k_new=None if kn is None else kn.float(),
                                            v_new=None if vn is None else vn.float())
    out = nbp_kernels.block_decode_attention(q, kc, vc, seq, k_new=kn, v_new=vn, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    _close(out, want, TOL[dtype][0], "out")
    if kn is not None:
        reference.kv_append_(ref_k, ref_v, kn, vn, seq)
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v), "fused append wrote the caches wrongly"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kv_append(backend, dtype):
    """Per-row lengths, an odd block length, head dim 96: the caches equal the reference's exactly."""
    _usable(backend, dtype)
    B, H, L, D, cap = 3, 2, 7, 96, 64
    kc, vc = (_rand(B, H, cap, D, dtype=dtype, seed=i) for i in range(2))
    kn, vn = (_rand(B, H, L, D, dtype=dtype, seed=2 + i) for i in range(2))
    seq = torch.tensor([0, 20, cap - L], dtype=torch.int32, device=DEVICE)
    ref_k, ref_v = kc.clone(), vc.clone()
    reference.kv_append_(ref_k, ref_v, kn, vn, seq)
    nbp_kernels.kv_append_(kc, vc, kn, vn, seq, backend=backend)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
