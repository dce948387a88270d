"""The packed CPU linear (nbp_kernels.packed_linear) against nbp_kernels.reference.linear
(and, with act="gelu", reference.gelu_linear)."""
import math

import pytest
import torch
import torch.nn.functional as F

from cpu_isa_paths import ISAS, force_isa
from nbp_kernels import prefill_gemm, reference
from nbp_kernels.packed_linear import (MAX_ROWS, PANEL, PackedLinear, is_available, pack_weight,
                                       packed_linear)

DTYPES = [torch.float32, torch.bfloat16, torch.int8]
# The kernels' GELU against reference.gelu in float64: within 5.5e-7 relative (vmath.h's
# vphi2) down to |GELU| ~ 1e-37, below which float32 may flush it to zero.
GELU_TOL = {"rtol": 1e-6, "atol": 1e-36}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    return force_isa(monkeypatch, request.param, is_available)


needs_kernel = pytest.mark.usefixtures("isa")


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
    (7, 64, 72),             # AVX2/NEON row tiles of 6 plus one
    (16, 384, 1152),         # full register tiles: an NBP step of L = 16
    (17, 80, 47),            # a full tile plus one row; a partial panel
    (33, 128, 100),          # above MAX_ROWS: the kernel itself still handles it
])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu"], ids=["noact", "gelu"])
def test_matches_reference(M, K, N, bias, threads, dtype, act):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, w = _rand(M, K, seed=1), _rand(N, K, seed=2)
        b = _rand(N, seed=3) if bias else None
        stored, scale = reference.quantize_weight(w, dtype)
        packed = pack_weight(stored)
        got = packed_linear(x, packed, b, N, scale, act=act)
        plain = packed_linear(x, packed, b, N, scale) if act else got
    finally:
        torch.set_num_threads(before)
    want = reference.dequantized_linear(x.double(), stored, scale,
                                        None if b is None else b.double())
    if act:   # GELU's slope is at most 1.13: the product's rounding passes through it
        want = reference.gelu(want)
        # the epilogue is the GELU of the plain kernel's output, to a few float32 ulp
        torch.testing.assert_close(got.double(), reference.gelu(plain.double()), **GELU_TOL)
    # fp32 dot products of length K: rounding grows like sqrt(K) * eps * |x||w|
    # (|w| <= 1.0x the fp32 weight's for bf16, 1 + 1/254 of it for int8)
    torch.testing.assert_close(got.double(), want, atol=2e-6 * K ** 0.5 * 4 * 1.2, rtol=1e-5)


@needs_kernel
def test_gelu_accuracy_over_its_range():
    """act="gelu" on a dense sweep of x in [-13, 13], through an identity weight (the product
    is x exactly): within 1e-6 relative of the exact GELU in float64 (glibc's erfcf, which the
    kernels called before vmath.h's vphi2, was 1.2e-5 off near x = -13); x itself far above 0,
    zero far below it, and subnormal inputs halved."""
    K = 64
    eye = pack_weight(torch.eye(K))
    x = torch.linspace(-13, 13, 4096 * K).reshape(4096, K)
    got = packed_linear(x, eye, None, K, None, act="gelu")
    torch.testing.assert_close(got.double(), reference.gelu(x.double()), **GELU_TOL)
    edge = torch.zeros(1, K)
    edge[0, :6] = torch.tensor([30.5, 1e4, -30.5, -1e4, 1e-40, -1e-40])
    got = packed_linear(edge, eye, None, K, None, act="gelu")[0, :6]
    assert got.tolist() == [30.5, 1e4, 0.0, 0.0, edge[0, 4].item() / 2, edge[0, 5].item() / 2]


@needs_kernel
@pytest.mark.parametrize("M, K, N", [
    (16, 384, 10930),   # an NBP step of L = 16 against a head-sized weight; a partial panel
    (9, 260, 16200),    # a full AVX-512 row tile plus one row
    (2, 97, 43300),     # one short tile, an odd K
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_products_match_reference_and_one_row_at_a_time(M, K, N, dtype):
    """Products of at least 2**22 weights read x transposed on AVX-512 (pack_rows): every
    row equals the reference, and equals that row computed alone (the one-row path, x as
    is) bit for bit: the same products summed in the same order."""
    x, w, b = _rand(M, K, seed=4), _rand(N, K, seed=5), _rand(N, seed=6)
    assert N * K >= 1 << 22
    stored, scale = reference.quantize_weight(w, dtype)
    packed = pack_weight(stored)
    res = _rand(M, N, seed=7)
    got = packed_linear(x, packed, b, N, scale, act="gelu", residual=res)
    for m in range(M):
        alone = packed_linear(x[m:m + 1], packed, b, N, scale, act="gelu", residual=res[m:m + 1])
        assert torch.equal(got[m:m + 1], alone), m
    want = reference.gelu(reference.dequantized_linear(x.double(), stored, scale, b.double()))
    torch.testing.assert_close(got.double(), want + res.double(),
                               atol=2e-6 * K ** 0.5 * 4 * 1.2, rtol=1e-5)


def test_gelu_reference():
    """reference.gelu is torch's exact GELU where that is accurate, and keeps its relative
    accuracy where torch's 1 + erf cancels (float64 below -7, float32 below -3)."""
    y = torch.linspace(-6, 8, 2001, dtype=torch.float64)
    torch.testing.assert_close(reference.gelu(y), F.gelu(y), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(reference.gelu(y.float()), F.gelu(y.float()), rtol=1e-5, atol=1e-6)
    far = torch.tensor([-9.0, -20.0], dtype=torch.float64)
    assert bool((reference.gelu(far) < 0).all()) and not F.gelu(far).any()
    # the asymptotic series y Phi(y) ~ -phi(y) (1 - 1 / y^2 + 3 / y^4) at y = -20, to 15 / y^6
    phi = torch.exp(-far[1] ** 2 / 2) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(reference.gelu(far[1]), -phi * (1 - 1 / 20 ** 2 + 3 / 20 ** 4),
                               rtol=1e-6, atol=0)


def test_quantize_weight_reference():
    """bf16 rounds to nearest; int8 per output channel within half a step of the weight."""
    w = _rand(37, 50, seed=11)
    w[3] = 0.0
    b16, none = reference.quantize_weight(w, torch.bfloat16)
    assert none is None and torch.equal(b16, w.bfloat16())
    q, scale = reference.quantize_weight(w, torch.int8)
    assert q.dtype == torch.int8 and scale.shape == (37,) and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and not q[3].any() and scale[3] == 1.0
    err = (q.float() * scale[:, None] - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())
    with pytest.raises(ValueError, match="dtype: expected torch.float32, torch.bfloat16 or torch.int8"):
        reference.quantize_weight(w, torch.float16)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantized_error_against_the_float32_weight(dtype):
    """What a narrower weight costs, against the float32 product: bounded by its rounding."""
    x, w = _rand(16, 384, seed=12), _rand(1000, 384, seed=13) * 0.05
    stored, scale = reference.quantize_weight(w, dtype)
    got = packed_linear(x, pack_weight(stored), None, 1000, scale)
    exact = reference.linear(x.double(), w.double())
    rel = float((got.double() - exact).norm() / exact.norm())
    bound = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.int8: 1.5e-2}[dtype]
    assert rel < bound, rel


@needs_kernel
def test_leading_dims_strides_and_empty():
    w, b = _rand(40, 24, seed=4), _rand(40, seed=5)
    p = pack_weight(w)
    x = _rand(2, 24, 3, seed=6).transpose(1, 2)              # [2, 3, 24], not contiguous
    torch.testing.assert_close(packed_linear(x, p, b, 40), reference.linear(x, w, b))
    assert packed_linear(torch.empty(0, 24), p, b, 40).shape == (0, 40)
    torch.testing.assert_close(packed_linear(torch.empty(3, 0), pack_weight(torch.empty(40, 0)), b, 40),
                               b.expand(3, -1))
    # no inputs: each row is the activation of the bias (or of zeros)
    assert torch.equal(packed_linear(torch.empty(3, 0), pack_weight(torch.empty(40, 0)), b, 40,
                                     act="gelu"), F.gelu(b).expand(3, -1))
    assert torch.equal(packed_linear(torch.empty(3, 0), pack_weight(torch.empty(40, 0)), None, 40,
                                     act="gelu"), torch.zeros(3, 40))
    got = packed_linear(x, p, b, 40, act="gelu")
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, reference.gelu_linear(x, w, b))


@needs_kernel
@pytest.mark.parametrize("dtype", [None, *DTYPES], ids=str)
def test_packed_module_routes_by_rows(dtype, monkeypatch):
    """Few rows use the kernel; a float32 prefill-sized input uses oneDNN (the default route)
    or the module (BLAS); every row count computes the same function of the stored weight,
    with or without the GELU."""
    lin = torch.nn.Linear(64, 50)
    pl = PackedLinear(lin, weight_dtype=dtype)
    stored, scale = reference.quantize_weight(lin.weight.detach(), dtype or torch.float32)
    with torch.no_grad():
        for rows in (1, 2, 16, MAX_ROWS, MAX_ROWS + 1, 300):
            x = _rand(1, rows, 64, seed=rows)
            want = reference.dequantized_linear(x, stored, scale, lin.bias)
            torch.testing.assert_close(pl(x), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pl(x, act="gelu"), reference.gelu(want), atol=1e-5,
                                       rtol=1e-5)
        if dtype in (None, torch.float32):   # the module's own forward, then torch's GELU
            monkeypatch.setenv(prefill_gemm.ENV, "blas")   # (oneDNN: tests/test_prefill_gemm)
            x = _rand(MAX_ROWS + 1, 64, seed=1)
            assert torch.equal(pl(x, act="gelu"), F.gelu(lin(x)))
        with pytest.raises(ValueError, match="act: expected None or 'gelu', got 'relu'"):
            pl(_rand(2, 64), act="relu")


@needs_kernel
@pytest.mark.parametrize("dtype", [None, *DTYPES], ids=str)
def test_many_is_each_linear_alone_bit_for_bit(dtype):
    """PackedLinears.many (q, k and v of a layer in one launch) returns exactly what each
    linear returns alone, at every row count and for widths not a multiple of the panel."""
    from nbp_kernels.cpu_ops import PackedLinears

    mods = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 40),
                               torch.nn.Linear(96, 33, bias=False))
    linears = PackedLinears(mods, weight_dtype=dtype)
    with torch.no_grad():
        for rows in (1, 5, 16, MAX_ROWS, MAX_ROWS + 1):
            x = _rand(2, rows, 96, seed=rows)
            got = linears.many(tuple(mods), x)
            assert [tuple(g.shape) for g in got] == [(2, rows, n) for n in (96, 40, 33)]
            for g, m in zip(got, mods):
                assert torch.equal(g, linears(m, x))


def test_stacked_errors():
    parts = [PackedLinear(torch.nn.Linear(8, 4)), PackedLinear(torch.nn.Linear(6, 4))]
    with pytest.raises(ValueError, match="parts: expected PackedLinears of one weight dtype"):
        PackedLinear.stacked(parts)
    with pytest.raises(ValueError, match="parts: expected"):
        PackedLinear.stacked([])


def test_packed_module_errors():
    with pytest.raises(ValueError, match="weight_dtype: expected None, torch.float32"):
        PackedLinear(torch.nn.Linear(4, 4), weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="module: expected a float32 CPU weight"):
        PackedLinear(torch.nn.Linear(4, 4).bfloat16())


@needs_kernel
def test_custom_op_and_compile():
    w, b = _rand(50, 32, seed=7), _rand(50, seed=8)
    p, x = pack_weight(w), _rand(4, 32, seed=9)
    torch.library.opcheck(torch.ops.nbp.packed_linear.default, (x, p, b, 50))
    q, scale = reference.quantize_weight(w, torch.int8)
    torch.library.opcheck(torch.ops.nbp.packed_linear.default, (x, pack_weight(q), b, 50, scale))
    f = torch.compile(lambda x: packed_linear(x, p, b, 50) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), reference.linear(x, w, b) * 2)
    torch.library.opcheck(torch.ops.nbp.packed_linear.default, (x, p, b, 50, None, "gelu"))
    g = torch.compile(lambda x: packed_linear(x, p, b, 50, act="gelu"), fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(g(x), reference.gelu_linear(x, w, b))


@pytest.mark.parametrize("args, match", [
    (lambda x, p, b: (x.double(), p, b, 40), "x: expected float32"),
    (lambda x, p, b: (x[:, :20], p, b, 40), r"x: expected \[..., 24\]"),
    (lambda x, p, b: (x, p[:2], b, 40), "packed: expected pack_weight's layout"),
    (lambda x, p, b: (x, p, b, 60), "packed: expected pack_weight's layout"),
    (lambda x, p, b: (x, p.half(), b, 40), "packed: expected float32, bfloat16 or int8"),
    (lambda x, p, b: (x, p, b[:39], 40), r"bias: expected shape \(40,\)"),
    (lambda x, p, b: (x, p, b, 0), "out_features: expected a positive int"),
    (lambda x, p, b: (x, p, b, True), "out_features: expected a positive int"),
    (lambda x, p, b: (x.requires_grad_(), p, b, 40), "inference only"),
    (lambda x, p, b: (x, p, b, 40, torch.ones(40)), "scale: expected float32 \\[40\\] with int8"),
    (lambda x, p, b: (x, p.to(torch.int8), b, 40), "scale: expected float32 \\[40\\] with int8"),
    (lambda x, p, b: (x, p.to(torch.int8), b, 40, torch.ones(39)), r"scale: expected shape \(40,\)"),
    (lambda x, p, b: (x, p.to(torch.int8), b, 40, torch.ones(40).double()), "scale: expected float32"),
    (lambda x, p, b: (x, p, b, 40, None, "relu"), "act: expected None or 'gelu', got 'relu'"),
    (lambda x, p, b: (x, p, b, 40, None, 1), "act: expected None or 'gelu', got 1"),
])
def test_errors(args, match):
    x, p, b = _rand(3, 24), pack_weight(_rand(40, 24)), _rand(40)
    with pytest.raises(ValueError, match=match):
        packed_linear(*args(x, p, b))


def test_pack_errors():
    with pytest.raises(ValueError, match="weight: expected float32, bfloat16 or int8 on the CPU"):
        pack_weight(torch.zeros(4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight: expected a 2-d tensor"):
        pack_weight(torch.zeros(4))


# norm variants of the LayerNorm prologue: affine, weight only (bias 0), neither, a large eps
_NORMS = {"affine": lambda K: (_rand(K, seed=21), _rand(K, seed=22), 1e-5),
          "weight": lambda K: (_rand(K, seed=21), None, 1e-5),
          "plain": lambda K: (None, None, 1e-5),
          "eps": lambda K: (_rand(K, seed=21), _rand(K, seed=22), 0.5)}
_SHAPES = [(1, 384, 64000 // 50), (1, 96, 17), (2, 7, 1), (7, 64, 72), (16, 384, 1152),
           (17, 80, 47), (33, 128, 100)]


@needs_kernel
@pytest.mark.parametrize("norm, residual", [(None, True)] + [(n, r) for n in _NORMS
                                                              for r in (False, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "gelu"], ids=["noact", "gelu"])
def test_prologue_and_residual_match_reference(norm, residual, dtype, act):
    """act(layer_norm(x) @ W.T + bias) + residual against reference.fused_linear in float64,
    over the shapes of test_matches_reference; the residual is added exactly (float32 add
    of the plain kernel's output)."""
    for M, K, N in _SHAPES:
        x, w = _rand(M, K, seed=1) * 3 + 1, _rand(N, K, seed=2)   # rows far from normalised
        b, r = _rand(N, seed=3), (_rand(M, N, seed=4) if residual else None)
        n = _NORMS[norm](K) if norm else None
        stored, scale = reference.quantize_weight(w, dtype)
        packed = pack_weight(stored)
        got = packed_linear(x, packed, b, N, scale, act=act, norm=n, residual=r)
        want = reference.fused_linear(x.double(), stored, b, scale=scale, norm=n, act=act,
                                      residual=r)
        # normalised rows have |x| ~ |gamma| + |beta|: a few float32 roundings each
        tol = 2e-6 * K ** 0.5 * 4 * 1.2 * (4 if norm else 1)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=1e-5)
        if r is not None:
            plain = packed_linear(x, packed, b, N, scale, act=act, norm=n)
            assert torch.equal(got, plain + r)


@needs_kernel
def test_prologue_leading_dims_and_empty():
    w, b = _rand(40, 24, seed=4), _rand(40, seed=5)
    n, p = _NORMS["affine"](24), pack_weight(w)
    x = _rand(2, 24, 3, seed=6).transpose(1, 2)              # [2, 3, 24], not contiguous
    r = _rand(2, 40, 3, seed=7).transpose(1, 2)              # [2, 3, 40], not contiguous
    got = packed_linear(x, p, b, 40, act="gelu", norm=n, residual=r)
    assert got.shape == (2, 3, 40)
    torch.testing.assert_close(got, reference.fused_linear(x, w, b, norm=n, act="gelu", residual=r))
    assert packed_linear(torch.empty(0, 24), p, b, 40, norm=n, residual=torch.empty(0, 40)).shape \
        == (0, 40)
    r3 = _rand(3, 40, seed=8)   # no inputs: act(bias) + residual
    assert torch.equal(packed_linear(torch.empty(3, 0), pack_weight(torch.empty(40, 0)), b, 40,
                                     act="gelu", residual=r3), F.gelu(b) + r3)


@needs_kernel
@pytest.mark.parametrize("dtype", [None, *DTYPES], ids=str)
def test_packed_module_prologue_and_residual_at_every_row_count(dtype, monkeypatch):
    """PackedLinear(x, act, norm, residual) at every row count: the kernel, or (float32
    prefills) oneDNN, or on the BLAS route F.layer_norm, the module, F.gelu and the add
    in torch, bit for bit."""
    lin = torch.nn.Linear(64, 50)
    pl = PackedLinear(lin, weight_dtype=dtype)
    stored, scale = reference.quantize_weight(lin.weight.detach(), dtype or torch.float32)
    n = _NORMS["affine"](64)
    with torch.no_grad():
        for rows in (1, 2, 16, MAX_ROWS, MAX_ROWS + 1, 300):
            x, r = _rand(1, rows, 64, seed=rows) * 2, _rand(1, rows, 50, seed=rows + 1)
            want = reference.fused_linear(x, stored, lin.bias, scale=scale, norm=n, act="gelu",
                                          residual=r)
            torch.testing.assert_close(pl(x, act="gelu", norm=n, residual=r), want, atol=2e-5,
                                       rtol=1e-5)
        if dtype in (None, torch.float32):   # the BLAS route: the module's own forward
            monkeypatch.setenv(prefill_gemm.ENV, "blas")
            x, r = _rand(MAX_ROWS + 1, 64, seed=1), _rand(MAX_ROWS + 1, 50, seed=2)
            want = r + F.gelu(lin(F.layer_norm(x, (64,), n[0], n[1], n[2])))
            assert torch.equal(pl(x, act="gelu", norm=n, residual=r), want)


@needs_kernel
def test_many_with_norm_is_each_linear_alone_bit_for_bit():
    """PackedLinears.many(norm=ln) equals fused(m, x, norm=ln) of each part, bit for bit,
    at every row count (the prefill normalises once in torch)."""
    from nbp_kernels.cpu_ops import PackedLinears

    mods = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 40),
                               torch.nn.LayerNorm(96))
    torch.nn.init.normal_(mods[2].weight)
    linears = PackedLinears(mods)
    with torch.no_grad():
        for rows in (1, 5, 16, MAX_ROWS, MAX_ROWS + 1):
            x = _rand(2, rows, 96, seed=rows)
            got = linears.many((mods[0], mods[1]), x, norm=mods[2])
            for g, m in zip(got, mods):
                assert torch.equal(g, linears.fused(m, x, norm=mods[2]))
            torch.testing.assert_close(got[1], mods[1](mods[2](x)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="norm: expected None or an nn.LayerNorm"):
        linears.fused(mods[0], x, norm=torch.nn.RMSNorm(96))


@needs_kernel
def test_custom_op_with_norm_and_residual():
    w, b = _rand(50, 32, seed=7), _rand(50, seed=8)
    p, x, r = pack_weight(w), _rand(4, 32, seed=9), _rand(4, 50, seed=10)
    nw, nb = _NORMS["affine"](32)[:2]
    torch.library.opcheck(torch.ops.nbp.packed_linear.default,
                          (x, p, b, 50, None, "gelu", nw, nb, 1e-5, r))
    torch.library.opcheck(torch.ops.nbp.packed_linear.default, (x, p, b, 50, None, None, None,
                                                                None, 1e-5, None))
    f = torch.compile(lambda x, r: packed_linear(x, p, b, 50, norm=(nw, nb, 1e-5), residual=r),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, r), reference.fused_linear(x, w, b, norm=(nw, nb, 1e-5),
                                                               residual=r))


_NW = torch.ones(24)


@pytest.mark.parametrize("kw, match", [
    ({"norm": (_NW, None)}, r"norm: expected None or \(weight, bias, eps\)"),
    ({"norm": _NW}, r"norm: expected None or \(weight, bias, eps\)"),
    ({"norm": (torch.ones(23), None, 1e-5)}, r"norm: norm weight expected shape \(24,\)"),
    ({"norm": (None, torch.ones(24).double(), 1e-5)}, "norm: norm bias expected float32"),
    ({"norm": (_NW, None, -1.0)}, "norm: eps expected a finite float >= 0"),
    ({"norm": (_NW, None, float("nan"))}, "norm: eps expected a finite float >= 0"),
    ({"norm": (_NW, None, True)}, "norm: eps expected a finite float >= 0"),
    ({"norm": (torch.ones(24, requires_grad=True), None, 1e-5)}, "norm: inference only"),
    ({"residual": torch.ones(3, 41)}, r"residual: expected shape \(3, 40\)"),
    ({"residual": torch.ones(40)}, r"residual: expected shape \(3, 40\)"),
    ({"residual": torch.ones(3, 40).double()}, "residual: expected float32"),
    ({"residual": torch.ones(3, 40, requires_grad=True)}, "residual: inference only"),
])
def test_norm_and_residual_errors(kw, match):
    x, w, b = _rand(3, 24), _rand(40, 24), _rand(40)
    with pytest.raises(ValueError, match=match):
        packed_linear(x, pack_weight(w), b, 40, **kw)
    with pytest.raises(ValueError, match=match):   # the module's eager path checks them too
        PackedLinear(torch.nn.Linear(24, 40))(x, **kw)


@needs_kernel
def test_module_checks_each_new_norm():
    """A tuple passed again is not checked again (a decode step's calls); a list is, and any
    other tuple is checked when first passed."""
    pl, x = PackedLinear(torch.nn.Linear(24, 40)), _rand(3, 24)
    n = _NORMS["affine"](24)
    with torch.no_grad():
        first = pl(x, norm=n)
        assert torch.equal(pl(x, norm=n), first)
        as_list = list(n)
        assert torch.equal(pl(x, norm=as_list), first)
        as_list[2] = -1.0
        with pytest.raises(ValueError, match="norm: eps expected a finite float >= 0"):
            pl(x, norm=as_list)
        with pytest.raises(ValueError, match=r"norm: norm bias expected shape \(24,\)"):
            pl(x, norm=(n[0], torch.ones(23), 1e-5))
        assert torch.equal(pl(x, norm=n), first)
