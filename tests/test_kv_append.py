"""In-place KV append: Triton against nbp_kernels.reference.kv_append_; the torch backend's
unchecked append (nothing written outside the block or the cache)."""
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
needs_triton = pytest.mark.skipif(not _OK, reason=f"triton backend unusable: {_WHY}")
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _check_triton_append(kc, vc, kn, vn, lens):
    """The whole cache after the Triton append equals a clone with only the block replaced."""
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    want_k, want_v = kc.clone(), vc.clone()
    reference.kv_append_(want_k, want_v, kn, vn, sl)
    nbp_kernels.kv_append_(kc, vc, kn, vn, sl, backend="triton")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@needs_triton
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
    _check_triton_append(kc, vc, kn, vn, lens)


@needs_triton
def test_strided_new_block():
    """k_new as a transposed view of [B, L, H, D] activations."""
    kc, vc = torch.zeros(2, 2, 20, 96, device=DEVICE), torch.zeros(2, 2, 20, 96, device=DEVICE)
    kn, vn = (_rand(2, 5, 2, 96, seed=s).transpose(1, 2) for s in (5, 6))
    _check_triton_append(kc, vc, kn, vn, [3, 15])


@needs_triton
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


@needs_triton
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


# --- the torch backend with check_bounds=False: nothing outside the block (issue 18) ---

def clipped_append(k_cache, v_cache, k_new, v_new, lens):
    """The unchecked-append rule of every backend, one position at a time: position
    ``lens[b] + l`` is written when ``lens[b] >= 0`` and it is below max_seq."""
    k, v = k_cache.clone(), v_cache.clone()
    M, L = k.shape[2], k_new.shape[2]
    for b, s in enumerate(lens):
        for i in range(L):
            if s >= 0 and s + i < M:
                k[b, :, s + i] = k_new[b, :, i].to(k.dtype)
                v[b, :, s + i] = v_new[b, :, i].to(v.dtype)
    return k, v


def _torch_append(kc, vc, kn, vn, lens, fn=None):
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    (fn or nbp_kernels.kv_append_)(kc, vc, kn, vn, sl, backend="torch", check_bounds=False)


@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 2), L=st.integers(1, 9), M=st.integers(1, 20),
       D=st.sampled_from([4, 8]), same=st.booleans(), data=st.data())
def test_torch_unchecked_append_writes_only_the_block(B, H, L, M, D, same, data):
    """Negative lengths write nothing, an overflowing block is clipped at max_seq, k and v
    alike; the rest of the cache stays bit-identical (equal lengths take the slice path)."""
    lens = data.draw(st.lists(st.integers(-L - 2, M + 2), min_size=B, max_size=B))
    lens = [lens[0]] * B if same else lens
    kc, vc = _rand(B, H, M, D, seed=1), _rand(B, H, M, D, seed=2)
    kn, vn = _rand(B, H, L, D, seed=3), _rand(B, H, L, D, seed=4)
    want_k, want_v = clipped_append(kc, vc, kn, vn, lens)
    _torch_append(kc, vc, kn, vn, lens)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("lens", [[-2, -2], [-1, 3], [6, 6], [6, 1], [12, 0], [-9, 11]])
def test_torch_unchecked_append_compiled_needs_no_host_lengths(lens):
    """Under torch.compile (and on a GPU) the lengths stay on the device: the masked
    scatter path, which must keep the same rule without reading them."""
    B, H, L, M, D = 2, 2, 4, 9, 8
    kc, vc = _rand(B, H, M, D, seed=5), _rand(B, H, M, D, seed=6)
    kn, vn = _rand(B, H, L, D, seed=7), _rand(B, H, L, D, seed=8)
    want_k, want_v = clipped_append(kc, vc, kn, vn, lens)
    # resolve (and import) the backend eagerly first, as the generator does: an import
    # inside traced code cannot be one graph; a resolved op is a dict lookup
    _torch_append(kc.clone(), vc.clone(), kn, vn, lens)
    compiled = torch.compile(nbp_kernels.kv_append_, backend="aot_eager", fullgraph=True)
    _torch_append(kc, vc, kn, vn, lens, fn=compiled)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


def test_torch_unchecked_append_leaves_the_buffer_around_the_cache():
    """The cache is a slice of a larger buffer: a write at the slice's tail (negative
    index) or past max_seq would land in the buffer, which must stay zero."""
    B, H, L, M, D = 3, 1, 4, 10, 8
    kbuf, vbuf = torch.zeros(B, H, M + 6, D, device=DEVICE), torch.zeros(B, H, M + 6, D, device=DEVICE)
    kn, vn = _rand(B, H, L, D, seed=9), _rand(B, H, L, D, seed=10)
    _torch_append(kbuf[:, :, 3:M + 3], vbuf[:, :, 3:M + 3], kn, vn, [-2, M - 1, 0])
    assert not kbuf[0].any() and not vbuf[0].any()
    assert torch.equal(kbuf[1, :, M + 2], kn[1, :, 0]) and not kbuf[1, :, M + 3:].any()
    assert torch.equal(vbuf[2, :, 3:3 + L], vn[2]) and not vbuf[:, :, :3].any()


@needs_triton
@pytest.mark.parametrize("lens", [[10, 3, 12], [-2, 3, -5]])
def test_torch_and_triton_clip_an_overflow_alike(lens):
    """Overflow is clipped at max_seq and a negative length writes nothing, on both backends."""
    B, H, L, M, D = 3, 2, 5, 12, 64
    kn, vn = _rand(B, H, L, D, seed=11), _rand(B, H, L, D, seed=12)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    caches = []
    for backend in ("torch", "triton"):
        kc, vc = _rand(B, H, M, D, seed=13), _rand(B, H, M, D, seed=14)
        nbp_kernels.kv_append_(kc, vc, kn, vn, sl, backend=backend, check_bounds=False)
        caches.append((kc, vc))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
