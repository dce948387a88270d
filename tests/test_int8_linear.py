"""Dynamic int8 and int16 activations (nbp_kernels.int8_linear, act_dtype=torch.int8 /
torch.int16) against nbp_kernels.reference.quantize_rows / int8_linear, on every code path
this machine runs."""
from __future__ import annotations

import pytest
import torch
from cpu_isa_paths import feature_paths, force_path
from test_cli_cpu_options import check_act_dtype_cli
from test_weight_dtype import sharp_model, video_ids  # the sharp tiny model, shared

from nbp.cli import main
from nbp.generate import FastGenerator
from nbp_kernels import int8_linear as i8
from nbp_kernels import reference
from nbp_kernels.cpu_ops import PackedLinears
from nbp_kernels.packed_linear import MAX_ROWS, PackedLinear


@pytest.fixture(params=feature_paths({"avx512": "avx512_vnni", "avx2": "avx_vnni"}, "vnni"))
def path(request, monkeypatch):
    want = force_path(monkeypatch, request.param, i8.VNNI_ENV, i8.is_available,
                      lambda: i8.kernel_path()[0])
    assert i8.is_available()[1].startswith(f"{want}:")
    return want


@pytest.fixture(params=[torch.int8, torch.int16], ids=["a8", "a16"])
def adt(request):
    """The activations' integer dtype (act_dtype)."""
    return request.param


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _case(M, K, N, seed=0):
    """x [M, K] with an all-zero row (when M > 2), an int8 weight [N, K], its scales, a bias."""
    x, w, b = _rand(M, K, seed=seed), _rand(N, K, seed=seed + 1) * 0.1, _rand(N, seed=seed + 2)
    if M > 2:
        x[1] = 0
    wq, ws = reference.quantize_weight(w, torch.int8)
    return x, wq, ws, b


def test_quantize_rows_reference():
    """Per-row symmetric int8, rounding half to even; a zero row gives zeros and scale 0."""
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.0], [0.0] * 5, [-0.5, 0.25, 0.0, 0.0, 0.1]])
    xq, sx = reference.quantize_rows(x)
    assert xq.dtype == torch.int8 and sx.dtype == torch.float32 and sx.shape == (3,)
    assert xq[0].tolist() == [127, 2, 4, -2, 0]     # inv = 1: 2.5 -> 2, 3.5 -> 4
    assert not xq[1].any() and sx[1] == 0
    assert xq[2].tolist() == [-127, 64, 0, 0, 25] and sx[2] == torch.tensor(0.5) / 127
    x = _rand(40, 300, seed=3)
    xq, sx = reference.quantize_rows(x)
    assert bool((xq.abs().amax(dim=1) == 127).all())
    err = (xq.float() * sx[:, None] - x).abs()
    assert bool((err <= sx[:, None] * 0.5 * (1 + 1e-5)).all())


def test_act_levels():
    """int16 rows keep as many levels as leave every int32 sum with int8 weights exact."""
    assert reference.act_levels(torch.int8, 10**6) == 127
    assert reference.act_levels(torch.int16, 384) == 32767
    assert reference.act_levels(torch.int16, 516) == 32767 and reference.act_levels(
        torch.int16, 517) < 32767
    for K in (517, 1536, 4100, i8.MAX_IN_FEATURES):
        q = reference.act_levels(torch.int16, K)
        assert 127 * q * K < 2**31 <= 127 * (q + 1) * K
    with pytest.raises(ValueError, match="act_dtype: expected torch.int8 or torch.int16"):
        reference.act_levels(torch.float32, 8)


def test_quantize_rows_int16_reference():
    """int16 rows: the same rule with act_levels' Q; error at most half a step of amax / Q."""
    x = _rand(40, 1536, seed=3)
    x[5] = 0
    xq, sx = reference.quantize_rows(x, torch.int16)
    Q = reference.act_levels(torch.int16, 1536)
    assert xq.dtype == torch.int16 and sx.dtype == torch.float32
    assert bool((xq.abs().amax(dim=1)[torch.arange(40) != 5] == Q).all())
    assert not xq[5].any() and sx[5] == 0
    err = (xq.double() * sx.double()[:, None] - x.double()).abs()
    # half a step, plus x * inv's float32 rounding (a few 1e-4 of a step at 11008 levels)
    assert bool((err <= sx.double()[:, None] * 0.5 * (1 + 1e-3)).all())
    assert float(err.amax() / x.abs().amax()) < 1e-4   # near float32 rows


def test_int8_linear_reference_is_the_integer_sum(adt):
    """reference.int8_linear: the exact integer products (int64 here), then sx * w_scale."""
    x, wq, ws, b = _case(9, 1000, 33)
    xq, sx = reference.quantize_rows(x, adt)
    acc = (xq.long() @ wq.long().t()).float()
    assert torch.equal(reference.int8_linear(x, wq, ws, b, adt),
                       acc * (sx[:, None] * ws[None, :]) + b)
    assert torch.equal(reference.int8_linear(x, wq, ws, act_dtype=adt)[1], torch.zeros(33))


def test_pack_layout():
    """packed[p, k, j, t] = stored[16 p + j, 4 k + t], zero-padded; corr = 128 x row sums."""
    wq = torch.randint(-127, 128, (37, 7), dtype=torch.int8)
    packed, corr = i8.pack_weight(wq)
    assert packed.shape == (3, 2, 16, 4) and packed.dtype == torch.int8 and packed.is_contiguous()
    assert packed[1, 1, 4, 2] == wq[20, 6] and not packed[:, 1, :, 3].any()
    assert not packed[2, :, 5:].any()
    assert corr.dtype == torch.int32 and corr.shape == (48,)
    assert torch.equal(corr[:37], wq.long().sum(1).int() * 128) and not corr[37:].any()


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference_bit_for_bit(path, adt, bias):
    """Awkward sizes (K not a multiple of 4 or 16, partial panels and row tiles, a prefill):
    every path computes the same int32 sums and float32 epilogue, so equal floats."""
    for M in (1, 3, 9, 16, 33, 512):
        for K in (7, 96, 384, 1000, 1536):
            for N in (1, 17, 100, 1536):
                x, wq, ws, b = _case(M, K, N, seed=M + K + N)
                packed, corr = i8.pack_weight(wq)
                got = i8.int8_linear(x, packed, corr, ws, b if bias else None, N, act_dtype=adt)
                want = reference.int8_linear(x, wq, ws, b if bias else None, adt)
                assert torch.equal(got, want), (path, M, K, N, (got - want).abs().max())


# reference.gelu in float64 against the kernel's float32 GELU: within 5.5e-7 relative, and
# float32 may flush values below ~1e-37 (tests/test_packed_linear.py)
GELU_TOL = {"rtol": 1e-6, "atol": 1e-36}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gelu_matches_reference(path, adt, bias):
    """act="gelu": the exact GELU of the (bit-exact) integer product, over the same awkward
    sizes; the product itself unchanged by it."""
    for M in (1, 3, 16, 33, 512):
        for K in (7, 96, 384, 1000):
            for N in (1, 17, 100, 1536):
                x, wq, ws, b = _case(M, K, N, seed=M + K + N)
                x = x * 4   # outputs down to about -10: GELU's tail
                packed, corr = i8.pack_weight(wq)
                got = i8.int8_linear(x, packed, corr, ws, b if bias else None, N, act="gelu",
                                     act_dtype=adt)
                want = reference.int8_linear(x, wq, ws, b if bias else None, adt)
                torch.testing.assert_close(got.double(), reference.gelu(want.double()),
                                           **GELU_TOL)


def test_row_scale_from_the_largest_magnitude_anywhere(path, adt):
    """Each row's scale is its largest |x|, wherever it lies (any lane of the kernel's vector
    max, or the scalar tail past the last whole 64 floats) and whatever its sign."""
    K = 3 * 64 + 9
    _, wq, ws, b = _case(1, K, 20, seed=4)
    packed, corr = i8.pack_weight(wq)
    positions = (0, 5, 17, 63, 64 + 15, 127, 191, 192, K - 1)
    x = _rand(2 * len(positions), K, seed=6)
    for i, pos in enumerate(positions):
        x[2 * i, pos], x[2 * i + 1, pos] = 40.0, -40.0
    assert torch.equal(i8.int8_linear(x, packed, corr, ws, b, 20, act_dtype=adt),
                       reference.int8_linear(x, wq, ws, b, adt))


def test_long_rows_stay_exact(path):
    """K = 70000 at full scale: the true sums fit int32, the VNNI path's shifted u8 sums
    (255 x 127 x K) wrap, and the correction still gives the exact value."""
    K = 70000
    x = torch.ones(2, K)
    x[1, ::2] = -1
    wq = torch.full((20, K), 127, dtype=torch.int8)
    wq[3] = -127
    ws = torch.full((20,), 0.5)
    packed, corr = i8.pack_weight(wq)
    got = i8.int8_linear(x, packed, corr, ws, None, 20)
    assert torch.equal(got, reference.int8_linear(x, wq, ws))
    assert got[0, 0] == torch.tensor(127.0 * 127 * K).float() * (torch.tensor(1.0) / 127 * 0.5)


def test_int16_rows_at_the_int32_limit(path):
    """int16 rows at full scale against weights at 127: sums up to 127 Q K, just below 2^31
    (a lane of the kernel holds half of them; nothing overflows), for a decode width and
    K past 516, where Q drops below 32767; alternating signs cancel exactly."""
    for K in (384, 1536, 70000):
        x = torch.ones(3, K)
        x[1, ::2] = -1
        x[2, :K // 2] = -1
        wq = torch.full((20, K), 127, dtype=torch.int8)
        wq[3] = -127
        ws = torch.full((20,), 0.5)
        packed, corr = i8.pack_weight(wq)
        got = i8.int8_linear(x, packed, corr, ws, None, 20, act_dtype=torch.int16)
        assert torch.equal(got, reference.int8_linear(x, wq, ws, act_dtype=torch.int16))
        Q = reference.act_levels(torch.int16, K)
        assert got[0, 0] == torch.tensor(127.0 * Q * K).float() * (torch.tensor(1.0) / Q * 0.5)
        assert got[0, 3] == -got[0, 0] and got[2, 0] == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_leading_dims(path, adt, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, wq, ws, b = _case(2 * 17, 96, 100, seed=5)
        packed, corr = i8.pack_weight(wq)
        x3 = x.view(2, 17, 96).transpose(0, 1)           # [17, 2, 96], not contiguous
        got = i8.int8_linear(x3, packed, corr, ws, b, 100, act_dtype=adt)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (17, 2, 100)
    assert torch.equal(got, reference.int8_linear(x3.reshape(-1, 96), wq, ws, b, adt)
                       .view(17, 2, 100))


@pytest.mark.parametrize("threads", [1, 2])
def test_prefill_rows_prepared_across_threads_as_one_by_one(path, adt, threads):
    """64 rows and more are normalised and quantized across the threads (a prefill): each row
    gets exactly what it gets alone, with its LayerNorm, GELU and residual."""
    x, wq, ws, b = _case(131, 96, 40, seed=9)
    x = x * 3 + 1
    norm = (_rand(96, seed=21), _rand(96, seed=22), 1e-5)
    r = _rand(131, 40, seed=4)
    packed, corr = i8.pack_weight(wq)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = i8.int8_linear(x, packed, corr, ws, b, 40, "gelu", norm, r, adt)
        alone = torch.cat([i8.int8_linear(x[m:m + 1], packed, corr, ws, b, 40, "gelu", norm,
                                          r[m:m + 1], adt) for m in range(131)])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, alone)


@pytest.mark.usefixtures("path")
def test_zero_rows_and_empty_inputs(adt):
    """A zero row (sx = 0) gives exactly the bias; no rows, or no inputs, give the bias too."""
    _, wq, ws, b = _case(1, 40, 20)
    packed, corr = i8.pack_weight(wq)

    def lin(x, p, c, bias, **kw):
        return i8.int8_linear(x, p, c, ws, bias, 20, act_dtype=adt, **kw)
    assert torch.equal(lin(torch.zeros(3, 40), packed, corr, b), b.expand(3, -1))
    assert torch.equal(lin(torch.zeros(3, 40), packed, corr, None), torch.zeros(3, 20))
    assert lin(torch.empty(0, 40), packed, corr, b).shape == (0, 20)
    p0, c0 = i8.pack_weight(torch.empty(20, 0, dtype=torch.int8))
    assert torch.equal(lin(torch.empty(2, 0), p0, c0, b), b.expand(2, -1))
    assert torch.equal(lin(torch.empty(2, 0), p0, c0, b, act="gelu"),
                       torch.nn.functional.gelu(b).expand(2, -1))
    assert torch.equal(lin(torch.zeros(3, 40), packed, corr, None, act="gelu"), torch.zeros(3, 20))


def test_paths_agree_where_no_kernel(monkeypatch):
    monkeypatch.setenv("NBP_CPU_ISA", "off")
    assert i8.kernel_path() == (None, "NBP_CPU_ISA=off")
    assert i8.is_available() == (False, "NBP_CPU_ISA=off")


@pytest.mark.parametrize("args, match", [
    (lambda x, p, c, s, b: (x.double(), p, c, s, b, 40), "x: expected torch.float32"),
    (lambda x, p, c, s, b: (x[:, :20], p, c, s, b, 40), r"x: expected \[..., K\] with ceil"),
    (lambda x, p, c, s, b: (x, p[:2], c, s, b, 40), "packed: expected pack_weight's layout"),
    (lambda x, p, c, s, b: (x, p.float(), c, s, b, 40), "packed: expected torch.int8"),
    (lambda x, p, c, s, b: (x, p, c[:40], s, b, 40), r"corr: expected shape \(48,\)"),
    (lambda x, p, c, s, b: (x, p, c.long(), s, b, 40), "corr: expected torch.int32"),
    (lambda x, p, c, s, b: (x, p, c, None, b, 40), "scale: expected torch.float32"),
    (lambda x, p, c, s, b: (x, p, c, s[:39], b, 40), r"scale: expected shape \(40,\)"),
    (lambda x, p, c, s, b: (x, p, c, s, b.double(), 40), "bias: expected torch.float32"),
    (lambda x, p, c, s, b: (x, p, c, s, b, 0), "out_features: expected a positive int"),
    (lambda x, p, c, s, b: (x.requires_grad_(), p, c, s, b, 40), "inference only"),
    (lambda x, p, c, s, b: (x, p, c, s, b, 40, "tanh"), "act: expected None or 'gelu', got 'tanh'"),
    (lambda x, p, c, s, b: (x, p, c, s, b, 40, None, None, None, torch.float16),
     "act_dtype: expected torch.int8 or torch.int16, got torch.float16"),
])
def test_errors(args, match):
    x, wq, ws, b = _case(3, 24, 40)
    packed, corr = i8.pack_weight(wq)
    with pytest.raises(ValueError, match=match):
        i8.int8_linear(*args(x, packed, corr, ws, b))


def test_pack_errors():
    with pytest.raises(ValueError, match="stored: expected int8 on the CPU"):
        i8.pack_weight(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="stored: expected a 2-d tensor"):
        i8.pack_weight(torch.zeros(4, dtype=torch.int8))
    with pytest.raises(ValueError, match="stored: expected at most 131072 in_features"):
        i8.pack_weight(torch.zeros(1, i8.MAX_IN_FEATURES + 1, dtype=torch.int8))


@pytest.mark.usefixtures("path")
def test_custom_op_and_compile():
    x, wq, ws, b = _case(4, 32, 50)
    packed, corr = i8.pack_weight(wq)
    torch.library.opcheck(torch.ops.nbp.int8_linear.default, (x, packed, corr, ws, b, 50))
    torch.library.opcheck(torch.ops.nbp.int8_linear.default, (x, packed, corr, ws, b, 50),
                          {"act_dtype": torch.int16})
    h = torch.compile(lambda x: i8.int8_linear(x, packed, corr, ws, b, 50, act_dtype=torch.int16),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(h(x), reference.int8_linear(x, wq, ws, b, torch.int16))
    f = torch.compile(lambda x: i8.int8_linear(x, packed, corr, ws, b, 50) * 2, fullgraph=True,
                      backend="aot_eager")
    assert torch.equal(f(x), reference.int8_linear(x, wq, ws, b) * 2)
    torch.library.opcheck(torch.ops.nbp.int8_linear.default, (x, packed, corr, ws, b, 50, "gelu"))
    g = torch.compile(lambda x: i8.int8_linear(x, packed, corr, ws, b, 50, act="gelu"),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(g(x).double(), reference.gelu(reference.int8_linear(x, wq, ws, b)
                                                             .double()), **GELU_TOL)


@pytest.mark.usefixtures("path")
def test_packed_linear_integer_acts_at_every_row_count(adt):
    """PackedLinear(act_dtype=torch.int8 / torch.int16): every row count (decode and
    prefill) through the kernel, equal to the reference; a wrong width is refused."""
    lin = torch.nn.Linear(70, 50)
    pl = PackedLinear(lin, weight_dtype=torch.int8, act_dtype=adt)
    wq, ws = reference.quantize_weight(lin.weight.detach(), torch.int8)
    with torch.no_grad():
        for rows in (1, 2, 16, MAX_ROWS + 1, 300):
            x = _rand(rows, 70, seed=rows)
            want = reference.int8_linear(x, wq, ws, lin.bias.detach(), adt)
            assert torch.equal(pl(x), want)
            torch.testing.assert_close(pl(x, act="gelu").double(),
                                       reference.gelu(want.double()), **GELU_TOL)
        with pytest.raises(ValueError, match=r"x: expected \[..., 70\]"):
            pl(_rand(2, 69))
        with pytest.raises(ValueError, match="x: expected torch.float32"):
            pl(_rand(2, 70).double())


@pytest.mark.usefixtures("path")
def test_many_is_each_linear_alone_bit_for_bit(adt):
    mods = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 40),
                               torch.nn.Linear(96, 33, bias=False))
    linears = PackedLinears(mods, weight_dtype=torch.int8, act_dtype=adt)
    with torch.no_grad():
        for rows in (1, 5, 16, MAX_ROWS + 1):
            x = _rand(2, rows, 96, seed=rows)
            got = linears.many(tuple(mods), x)
            for g, m in zip(got, mods):
                assert torch.equal(g, linears(m, x))


def test_act_dtype_errors():
    lin = torch.nn.Linear(8, 4)
    for wd in (None, torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="act_dtype: torch.int8 activations need weight_dtype"):
            PackedLinear(lin, weight_dtype=wd, act_dtype=torch.int8)
    with pytest.raises(ValueError, match="act_dtype: torch.int16 activations need weight_dtype"):
        PackedLinear(lin, weight_dtype=torch.bfloat16, act_dtype=torch.int16)
    with pytest.raises(ValueError, match="act_dtype: expected None, torch.float32, torch.int8, "
                                         "torch.int16 or torch.bfloat16"):
        PackedLinear(lin, weight_dtype=torch.int8, act_dtype=torch.float16)
    with pytest.raises(ValueError, match="act_dtype: torch.bfloat16 activations need "
                                         "weight_dtype=torch.bfloat16"):
        PackedLinear(lin, weight_dtype=torch.int8, act_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="act_dtype: torch.int8 activations need weight_dtype"):
        PackedLinears(torch.nn.Sequential(lin), act_dtype=torch.int8)
    model = sharp_model()
    with pytest.raises(ValueError, match="act_dtype: torch.int8 activations need weight_dtype"):
        FastGenerator(model, act_dtype=torch.int8)
    with pytest.raises(ValueError, match="act_dtype: expected None"):
        FastGenerator(model, weight_dtype=torch.int8, act_dtype="int8")
    for a in (torch.int8, torch.int16):
        parts = [PackedLinear(lin, torch.int8), PackedLinear(lin, torch.int8, a)]
        with pytest.raises(ValueError, match="parts: expected PackedLinears of one weight "
                                             "dtype, activation dtype"):
            PackedLinear.stacked(parts)


def test_generator_with_integer_activations(path, adt):
    """FastGenerator(act_dtype=torch.int8 / torch.int16): every linear is the reference
    int8_linear; greedy generation is deterministic and, the arithmetic being the same,
    equal on every path."""
    model = sharp_model()
    gen = FastGenerator(model, weight_dtype=torch.int8, act_dtype=adt)
    assert gen.act_dtype == adt and gen.linear.act_dtype == adt
    for m in (model.head, *[m for m in model.modules() if isinstance(m, torch.nn.Linear)][:2]):
        wq, ws = reference.quantize_weight(m.weight.detach(), torch.int8)
        x = _rand(16, m.in_features, seed=1)
        bias = None if m.bias is None else m.bias.detach()
        assert torch.equal(gen.linear(m, x), reference.int8_linear(x, wq, ws, bias, adt))
    ids = video_ids(model.config)
    out = {mode: gen.generate_tokens(ids, 32, mode=mode, do_sample=False) for mode in ("nbp", "ntp")}
    for mode, tokens in out.items():
        assert tokens.shape == (2, 32)
        assert bool(((tokens >= model.config.video_offset) & (tokens < model.config.vocab_size)).all())
        again = FastGenerator(model, weight_dtype=torch.int8, act_dtype=adt)
        assert torch.equal(again.generate_tokens(ids, 32, mode=mode, do_sample=False), tokens)
    first = _GREEDY.setdefault(str(adt), out["nbp"])
    assert torch.equal(out["nbp"], first), f"{path} differs from the first path run"


_GREEDY: dict[str, torch.Tensor] = {}


@pytest.mark.usefixtures("path")
def test_cli_flags(capsys, tmp_path):
    check_act_dtype_cli(capsys, tmp_path, "int8", ("int8", "int16"))


def test_info_names_the_int8_path(capsys, monkeypatch):
    import json

    monkeypatch.setenv("NBP_CPU_ISA", "off")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["int8_linear"] == {"path": None,
                                                                  "why": "NBP_CPU_ISA=off"}


# LayerNorm prologue variants: affine, weight only, neither, a large eps
_NORMS = {"affine": lambda K: (_rand(K, seed=21), _rand(K, seed=22), 1e-5),
          "weight": lambda K: (_rand(K, seed=21), None, 1e-5),
          "plain": lambda K: (None, None, 1e-5),
          "eps": lambda K: (_rand(K, seed=21), _rand(K, seed=22), 0.5)}


@pytest.mark.parametrize("norm, residual", [(None, True)] + [(n, r) for n in _NORMS
                                                              for r in (False, True)])
@pytest.mark.parametrize("act", [None, "gelu"], ids=["noact", "gelu"])
def test_prologue_and_residual_match_reference(path, adt, norm, residual, act):
    """The kernel quantizes its own LayerNorm of each row (within float32 rounding of
    F.layer_norm's): against reference.fused_linear(act_dtype=...), equal but where a
    value at a rounding boundary quantized one step apart (at most a step or two of one
    row's scale times a weight); the residual is added exactly after the activation."""
    for M in (1, 3, 16, 33):
        for K in (7, 96, 384):
            for N in (1, 17, 100):
                x, wq, ws, b = _case(M, K, N, seed=M + K + N)
                x = x * 3 + 1
                n = _NORMS[norm](K) if norm else None
                r = _rand(M, N, seed=M * N) if residual else None
                packed, corr = i8.pack_weight(wq)
                got = i8.int8_linear(x, packed, corr, ws, b, N, act, n, r, adt)
                want = reference.fused_linear(x, wq, b, scale=ws, norm=n, act=act, residual=r,
                                              act_dtype=adt)
                xn = x if n is None else torch.nn.functional.layer_norm(x, (K,), *n)
                step = float(xn.abs().amax() / reference.act_levels(adt, K)
                             * (wq.float() * ws[:, None]).abs().amax())
                torch.testing.assert_close(got, want, atol=2 * step + 1e-5, rtol=1e-5)
                # such a boundary is rare with 255 levels: every other row within float32
                # rounding (int16's are 86-258x denser, so common, and as much smaller)
                off = (got - want).abs() > 1e-5 * (1 + want.abs())
                assert adt == torch.int16 or int(off.any(dim=1).sum()) <= 1, (M, K, N)
                if n is None and act is None:   # the product, then the residual's add: exact
                    assert torch.equal(got, want)
                if r is not None:
                    assert torch.equal(got, i8.int8_linear(x, packed, corr, ws, b, N, act, n,
                                                           act_dtype=adt) + r)


@pytest.mark.usefixtures("path")
def test_prologue_empty_and_zero_rows(adt):
    """No rows; no inputs (act(bias) + residual); a constant row normalises to beta."""
    _, wq, ws, b = _case(1, 40, 20)
    packed, corr = i8.pack_weight(wq)
    n, r = _NORMS["affine"](40), _rand(3, 20, seed=5)
    assert i8.int8_linear(torch.empty(0, 40), packed, corr, ws, b, 20, norm=n,
                          residual=torch.empty(0, 20), act_dtype=adt).shape == (0, 20)
    p0, c0 = i8.pack_weight(torch.empty(20, 0, dtype=torch.int8))
    assert torch.equal(i8.int8_linear(torch.empty(3, 0), p0, c0, ws, b, 20, act="gelu",
                                      residual=r, act_dtype=adt), torch.nn.functional.gelu(b) + r)
    const = torch.full((3, 40), 2.5)   # normalises to exactly 0: with no beta, the bias
    assert torch.equal(i8.int8_linear(const, packed, corr, ws, b, 20, norm=(n[0], None, 1e-5),
                                      residual=r, act_dtype=adt), b + r)


@pytest.mark.usefixtures("path")
def test_packed_linear_int8_prologue_and_many(adt):
    """PackedLinear / PackedLinears with integer activations: norm and residual at every row
    count (always the kernel); many(norm=) equals each fused part bit for bit."""
    mods = torch.nn.Sequential(torch.nn.Linear(96, 96), torch.nn.Linear(96, 40),
                               torch.nn.LayerNorm(96))
    torch.nn.init.normal_(mods[2].weight)
    linears = PackedLinears(mods, weight_dtype=torch.int8, act_dtype=adt)
    ln = mods[2]
    nargs = (ln.weight.detach(), ln.bias.detach(), ln.eps)
    wq, ws = reference.quantize_weight(mods[1].weight.detach(), torch.int8)
    with torch.no_grad():
        for rows in (1, 5, 16, MAX_ROWS + 1):
            x, r = _rand(2, rows, 96, seed=rows), _rand(2, rows, 40, seed=rows + 1)
            got = linears.many((mods[0], mods[1]), x, norm=ln)
            for g, m in zip(got, mods):
                assert torch.equal(g, linears.fused(m, x, norm=ln))
            fused = linears.fused(mods[1], x, norm=ln, act="gelu", residual=r)
            want = reference.fused_linear(x, wq, mods[1].bias, scale=ws, norm=nargs, act="gelu",
                                          residual=r, act_dtype=adt)
            torch.testing.assert_close(fused, want, atol=1e-2, rtol=1e-5)
            assert torch.equal(fused, linears.fused(mods[1], x, norm=ln, act="gelu") + r)


@pytest.mark.usefixtures("path")
def test_custom_op_with_norm_and_residual():
    x, wq, ws, b = _case(4, 32, 50)
    packed, corr = i8.pack_weight(wq)
    nw, nb, _ = _NORMS["affine"](32)
    r = _rand(4, 50, seed=3)
    torch.library.opcheck(torch.ops.nbp.int8_linear.default,
                          (x, packed, corr, ws, b, 50, "gelu", nw, nb, 1e-5, r))
    f = torch.compile(lambda x, r: i8.int8_linear(x, packed, corr, ws, b, 50, None,
                                                   (nw, nb, 1e-5), r),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x, r), i8.int8_linear(x, packed, corr, ws, b, 50, None, (nw, nb, 1e-5),
                                               r))


@pytest.mark.parametrize("kw, match", [
    ({"norm": (torch.ones(23), None, 1e-5)}, r"norm: norm weight expected shape \(24,\)"),
    ({"norm": (None, None, -1e-5)}, "norm: eps expected a finite float >= 0"),
    ({"norm": (None, None)}, r"norm: expected None or \(weight, bias, eps\)"),
    ({"residual": torch.ones(3, 39)}, r"residual: expected shape \(3, 40\)"),
    ({"residual": torch.ones(3, 40, dtype=torch.bfloat16)}, "residual: expected float32"),
])
def test_norm_and_residual_errors(kw, match):
    x, wq, ws, b = _case(3, 24, 40)
    packed, corr = i8.pack_weight(wq)
    with pytest.raises(ValueError, match=match):
        i8.int8_linear(x, packed, corr, ws, b, 40, **kw)
    pl = PackedLinear(torch.nn.Linear(24, 40), weight_dtype=torch.int8, act_dtype=torch.int8)
    with pytest.raises(ValueError, match=match):
        pl(x, **kw)
