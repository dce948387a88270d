"""Triton in-place KV append against nbp_kernels.reference.kv_append_."""
import pytest
import torch

import nbp_kernels
from nbp_kernels import reference
from nbp_kernels.registry import backend_status

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_OK, _WHY = backend_status("triton", DEVICE)
pytestmark = pytest.mark.skipif(not _OK, reason=f"triton backend unusable: {_WHY}")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, H, L, M, D, lens", [
    (3, 2, 1, 17, 96, [0, 8, 16]),
    (2, 3, 16, 50, 64, [34, 5]),
    (2, 1, 64, 130, 128, [66, 0]),
    (1, 2, 7, 7, 80, [0]),
])
def test_matches_reference(B, H, L, M, D, lens, dtype):
    kc, vc = _rand(B, H, M, D, dtype=dtype, seed=1), _rand(B, H, M, D, dtype=dtype, seed=2)
    kn, vn = _rand(B, H, L, D, seed=3), _rand(B, H, L, D, seed=4)  # fp32 new block: cast on write
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want_k, want_v = kc.clone(), vc.clone()
    reference.kv_append_(want_k, want_v, kn, vn, sl)
    nbp_kernels.kv_append_(kc, vc, kn, vn, sl, backend="triton")
    # The whole cache equals a clone with only the block replaced.
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_strided_new_block():
    """k_new as a transposed view of [B, L, H, D] activations."""
    kc, vc = torch.zeros(2, 2, 20, 96, device=DEVICE), torch.zeros(2, 2, 20, 96, device=DEVICE)
    kn, vn = (_rand(2, 5, 2, 96, seed=s).transpose(1, 2) for s in (5, 6))
    sl = torch.tensor([3, 15], dtype=torch.int32, device=DEVICE)
    want_k, want_v = kc.clone(), vc.clone()
    reference.kv_append_(want_k, want_v, kn, vn, sl)
    nbp_kernels.kv_append_(kc, vc, kn, vn, sl, backend="triton")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_never_writes_past_max_seq():
    """Skipping the host check, an overflowing block is clipped at max_seq (the buffer tail stays 0)."""
    B, H, L, M, D = 2, 1, 6, 10, 64
    kbuf, vbuf = torch.zeros(B, H, M + 8, D, device=DEVICE), torch.zeros(B, H, M + 8, D, device=DEVICE)
    kn, vn = _rand(B, H, L, D, seed=7), _rand(B, H, L, D, seed=8)
    sl = torch.tensor([M - 2, 1], dtype=torch.int32, device=DEVICE)
    nbp_kernels.kv_append_(kbuf[:, :, :M], vbuf[:, :, :M], kn, vn, sl, backend="triton",
                           check_bounds=False)
    assert not kbuf[:, :, M:].any() and not vbuf[:, :, M:].any()
    assert torch.equal(kbuf[0, :, M - 2:M], kn[0, :, :2]) and torch.equal(vbuf[1, :, 1:1 + L], vn[1])
    assert not kbuf[0, :, :M - 2].any() and not kbuf[1, :, 1 + L:].any()


def test_bad_inputs_raise():
    kc, vc = torch.zeros(1, 1, 8, 64, device=DEVICE), torch.zeros(1, 1, 8, 64, device=DEVICE)
    kn = torch.ones(1, 1, 4, 64, device=DEVICE)
    with pytest.raises(ValueError, match="cache overflow"):
        nbp_kernels.kv_append_(kc, vc, kn, kn, torch.tensor([5], dtype=torch.int32, device=DEVICE),
                               backend="triton")
    with pytest.raises(ValueError, match="v_new"):
        nbp_kernels.kv_append_(kc, vc, kn, kn[:, :, :2], torch.zeros(1, dtype=torch.int32, device=DEVICE),
                               backend="triton")
    assert not kc.any()
