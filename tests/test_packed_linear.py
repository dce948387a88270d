"""The packed CPU linear (nbp_kernels.packed_linear) against nbp_kernels.reference.linear."""
import pytest
import torch

from nbp_kernels import reference
from nbp_kernels.packed_linear import (MAX_ROWS, PANEL, PackedLinear, is_available, pack_weight,
                                       packed_linear)

_OK, _WHY = is_available()
needs_kernel = pytest.mark.skipif(not _OK, reason=f"packed_linear unusable here: {_WHY}")


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_pack_layout():
    """Panel p, row k, lane j holds weight[16 p + j, k]; the last panel is zero-padded."""
    w = _rand(37, 5)
    p = pack_weight(w)
    assert p.shape == (3, 5, PANEL) and p.is_contiguous()
    assert torch.equal(p[1, 3, 4], w[20, 3]) and torch.equal(p[2, :, :5], w[32:].t())
    assert not p[2, :, 5:].any()


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M, K, N", [
    (1, 384, 64000 // 50),   # one row: the GEMV path over groups of panels
    (1, 96, 17),             # a partial panel and a partial group of panels
    (2, 7, 1),
    (5, 96, 33),
    (16, 384, 1152),         # one full register block: an NBP step of L = 16
    (17, 80, 48),            # a full block plus one row
    (33, 128, 100),          # above MAX_ROWS: the kernel itself still handles it
])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(M, K, N, bias, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = _rand(M, K, seed=1), _rand(N, K, seed=2)
        b = _rand(N, seed=3) if bias else None
        got = packed_linear(x, pack_weight(w), b, N)
    finally:
        torch.set_num_threads(before)
    want = reference.linear(x.double(), w.double(), None if b is None else b.double())
    # fp32 dot products of length K: rounding grows like sqrt(K) * eps * |x||w|
    torch.testing.assert_close(got.double(), want, atol=2e-6 * K ** 0.5 * 4, rtol=1e-5)


@needs_kernel
def test_leading_dims_strides_and_empty():
    w, b = _rand(40, 24, seed=4), _rand(40, seed=5)
    p = pack_weight(w)
    x = _rand(2, 24, 3, seed=6).transpose(1, 2)              # [2, 3, 24], not contiguous
    torch.testing.assert_close(packed_linear(x, p, b, 40), reference.linear(x, w, b))
    assert packed_linear(torch.empty(0, 24), p, b, 40).shape == (0, 40)
    torch.testing.assert_close(packed_linear(torch.empty(3, 0), pack_weight(torch.empty(40, 0)), b, 40),
                               b.expand(3, -1))


@needs_kernel
def test_packed_module_routes_by_rows():
    """Few rows use the kernel; a prefill-sized input uses the module (BLAS)."""
    lin = torch.nn.Linear(64, 50)
    pl = PackedLinear(lin)
    with torch.no_grad():
        for rows in (1, 2, 16, MAX_ROWS, MAX_ROWS + 1, 300):
            x = _rand(1, rows, 64, seed=rows)
            torch.testing.assert_close(pl(x), lin(x), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_custom_op_and_compile():
    w, b = _rand(50, 32, seed=7), _rand(50, seed=8)
    p, x = pack_weight(w), _rand(4, 32, seed=9)
    torch.library.opcheck(torch.ops.nbp.packed_linear.default, (x, p, b, 50))
    f = torch.compile(lambda x: packed_linear(x, p, b, 50) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), reference.linear(x, w, b) * 2)


@pytest.mark.parametrize("args, match", [
    (lambda x, p, b: (x.double(), p, b, 40), "x: expected float32"),
    (lambda x, p, b: (x[:, :20], p, b, 40), r"x: expected \[..., 24\]"),
    (lambda x, p, b: (x, p[:2], b, 40), "packed: expected pack_weight's layout"),
    (lambda x, p, b: (x, p, b, 60), "packed: expected pack_weight's layout"),
    (lambda x, p, b: (x, p, b[:39], 40), r"bias: expected shape \(40,\)"),
    (lambda x, p, b: (x, p, b, 0), "out_features: expected a positive int"),
    (lambda x, p, b: (x.requires_grad_(), p, b, 40), "inference only"),
])
def test_errors(args, match):
    x, p, b = _rand(3, 24), pack_weight(_rand(40, 24)), _rand(40)
    with pytest.raises(ValueError, match=match):
        packed_linear(*args(x, p, b))


def test_pack_errors():
    with pytest.raises(ValueError, match="weight: expected float32 on the CPU"):
        pack_weight(torch.zeros(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight: expected a 2-d tensor"):
        pack_weight(torch.zeros(4))
