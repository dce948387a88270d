"""bfloat16 activations with bfloat16 weights (act_dtype=torch.bfloat16: the rows of x rounded
to bfloat16, the weights packed in k pairs) against nbp_kernels.reference.bf16_rows /
fused_linear, on every code path this machine runs: AVX512-BF16 dot products, the AVX-512
FMAs on widened pairs (NBP_CPU_BF16=off) and the AVX2 build."""
from __future__ import annotations

import json

import pytest
import torch
from cpu_isa_paths import feature_paths, force_path
from test_cli_cpu_options import check_act_dtype_cli
from test_weight_dtype import sharp_model, video_ids  # the sharp tiny model, shared

from nbp.cli import main
from nbp.generate import FastGenerator
from nbp_kernels import packed_linear as pl
from nbp_kernels import reference
from nbp_kernels.packed_linear import MAX_ROWS, PackedLinear


@pytest.fixture(params=feature_paths({"avx512": "avx512_bf16"}, "bf16"))
def path(request, monkeypatch):
    return force_path(monkeypatch, request.param, pl.BF16_ENV, pl.is_available,
                      lambda: pl.bf16_path()[0])


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bound(x, stored, slack: float = 0.0):
    """|error| allowed against the float64 reference: float32 sums of K exact products
    (K ulps of the sum of |terms|), plus ``slack`` of that sum (a bf16 rounding of x
    that a last-ulp difference upstream moved to its neighbour: 2^-8)."""
    absdot = reference.bf16_rows(x.double()).abs() @ stored.double().abs().t()
    return absdot * (x.shape[-1] * 2.0**-23 + slack) + 1e-30


def test_bf16_rows_rounds_to_nearest_even():
    one = 1.0
    ulp = 2.0**-7   # bfloat16's spacing in [1, 2)
    x = torch.tensor([one + ulp / 2, one + 3 * ulp / 2, one + ulp / 2 + 2**-20, -2.5, float("nan")])
    r = reference.bf16_rows(x)
    assert r[:4].tolist() == [one, one + 2 * ulp, one + ulp, -2.5]
    assert torch.isnan(r[4]) and r.dtype == torch.float32
    assert reference.bf16_rows(x.double()).dtype == torch.float64


def test_pack_pairs_layout():
    w = torch.arange(3 * 5, dtype=torch.float32).view(3, 5).to(torch.bfloat16)
    packed = pl.pack_weight(w, pairs=True)
    assert packed.shape == (1, 3, 16, 2) and packed.dtype == torch.bfloat16
    for n in range(3):
        for k in range(5):
            assert packed[0, k // 2, n, k % 2] == w[n, k]
    assert not packed[0, 2, :, 1].any() and not packed[0, :, 3:].any()   # zero padding
    with pytest.raises(ValueError, match="pairs=True packs bfloat16 weights"):
        pl.pack_weight(w.float(), pairs=True)


def test_rows_round_as_torch_does(path):
    """One-hot weights copy x through exactly: the kernel's rounding of every row, ties and
    an odd width (the last pair's missing half) included, is torch's. A subnormal bfloat16
    counts as zero in vdpbf16ps (it treats them so); a NaN makes every output NaN."""
    K = 9
    x = torch.tensor([[1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38, 2.0**-126, -0.0, 7.1,
                       1e-40, 2.0**-7 * 1.5]])
    eye = pl.pack_weight(torch.eye(K, dtype=torch.bfloat16), pairs=True)
    y = pl.packed_linear(x, eye, None, K)
    want = reference.bf16_rows(x)
    keep = torch.arange(K) != 7
    assert torch.equal(y[0, keep], want[0, keep])
    assert y[0, 7] == (0.0 if path == "avx512-bf16" else want[0, 7])
    x[0, 3] = float("nan")
    assert bool(torch.isnan(pl.packed_linear(x, eye, None, K)).all())


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("M", [1, 2, 5, 16, 17, 33])
@pytest.mark.parametrize("K, N", [(1, 1), (7, 5), (96, 100), (383, 33), (384, 1152),
                                  (1536, 384)])
def test_matches_reference(M, K, N):
    x, w, b = _rand(M, K, seed=M), _rand(N, K, seed=K), _rand(N, seed=N)
    stored, _ = reference.quantize_weight(w, torch.bfloat16)
    y = pl.packed_linear(x, pl.pack_weight(stored, pairs=True), b, N)
    want = reference.fused_linear(x.double(), stored, b, act_dtype=torch.bfloat16)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert bool(((y.double() - want).abs() <= _bound(x, stored)).all())


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("norm", [None, "affine", "plain"])
@pytest.mark.parametrize("act, residual", [(None, False), ("gelu", False), (None, True)])
def test_prologue_and_epilogue(norm, act, residual):
    M, K, N = 16, 96, 70
    x, w, b = _rand(M, K, seed=1) * 3 + 1, _rand(N, K, seed=2), _rand(N, seed=3)
    stored, _ = reference.quantize_weight(w, torch.bfloat16)
    nrm = {None: None, "affine": (_rand(K, seed=4), _rand(K, seed=5), 1e-5),
           "plain": (None, None, 1e-3)}[norm]
    res = _rand(M, N, seed=6) if residual else None
    y = pl.packed_linear(x, pl.pack_weight(stored, pairs=True), b, N, act=act, norm=nrm,
                         residual=res)
    want = reference.fused_linear(x.double(), stored, b, norm=nrm, act=act, residual=res,
                                  act_dtype=torch.bfloat16)
    # the kernel's float32 LayerNorm may round a row element to the other bf16 neighbour
    xn = x if nrm is None else torch.nn.functional.layer_norm(x, (K,), *nrm[:2], nrm[2])
    slack = 2.0**-8 if nrm is not None else 0.0
    tol = _bound(xn, stored, slack) * 1.1 + (1e-5 if act else 0) + (1e-6 if residual else 0)
    assert bool(((y.double() - want).abs() <= tol).all())


@pytest.mark.usefixtures("path")
def test_packed_linear_at_every_row_count_and_threads():
    """PackedLinear(bfloat16, bfloat16): every row count (decode and prefill) through the
    kernel, the same floats at one and two threads and for leading dimensions."""
    lin = torch.nn.Linear(70, 50)
    p = PackedLinear(lin, weight_dtype=torch.bfloat16, act_dtype=torch.bfloat16)
    assert p.packed.dim() == 4 and not p.takes_module(300)
    stored, _ = reference.quantize_weight(lin.weight.detach(), torch.bfloat16)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            for rows in (1, 2, 16, MAX_ROWS + 1, 300):
                x = _rand(rows, 70, seed=rows)
                want = reference.fused_linear(x.double(), stored, lin.bias.detach(),
                                              act_dtype=torch.bfloat16)
                torch.set_num_threads(1)
                one = p(x)
                torch.set_num_threads(2)
                assert torch.equal(p(x), one)
                assert torch.equal(p(x.view(1, rows, 70))[0], one)
                assert bool(((one.double() - want).abs() <= _bound(x, stored)).all())
            with pytest.raises(ValueError, match=r"x: expected \[..., 70\]"):
                p(_rand(2, 69))
    finally:
        torch.set_num_threads(before)


def test_errors():
    lin = torch.nn.Linear(8, 4)
    for wd in (None, torch.float32, torch.int8):
        with pytest.raises(ValueError, match="act_dtype: torch.bfloat16 activations need "
                                             "weight_dtype=torch.bfloat16"):
            PackedLinear(lin, weight_dtype=wd, act_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="act_dtype: torch.int8 activations need "
                                         "weight_dtype=torch.int8"):
        PackedLinear(lin, weight_dtype=torch.bfloat16, act_dtype=torch.int8)
    packed = pl.pack_weight(lin.weight.detach().to(torch.bfloat16), pairs=True)
    with pytest.raises(ValueError, match=r"x: expected \[..., K\] with ceil\(K / 2\) = 4 "
                                         r"\(bfloat16 pairs of in_features\)"):
        pl.packed_linear(_rand(2, 10), packed, None, 4)
    with pytest.raises(ValueError, match="packed: expected pack_weight's layout"):
        pl.packed_linear(_rand(2, 8), packed, None, 20)
    with pytest.raises(ValueError, match="act_dtype: torch.bfloat16 activations need"):
        FastGenerator(sharp_model(), weight_dtype=torch.int8, act_dtype=torch.bfloat16)


def test_generator_with_bf16_activations(path):
    """FastGenerator(weight_dtype=act_dtype=torch.bfloat16): every linear is the reference's,
    decode steps run as one C call each, greedy generation is deterministic."""
    model = sharp_model()
    gen = FastGenerator(model, weight_dtype=torch.bfloat16, act_dtype=torch.bfloat16)
    assert gen.act_dtype == torch.bfloat16
    m = model.head
    stored, _ = reference.quantize_weight(m.weight.detach(), torch.bfloat16)
    x = _rand(16, m.in_features, seed=1)
    want = reference.fused_linear(x.double(), stored, None, act_dtype=torch.bfloat16)
    assert bool(((gen.linear(m, x).double() - want).abs() <= _bound(x, stored)).all())
    ids = video_ids(model.config)
    for mode in ("nbp", "ntp"):
        tokens = gen.generate_tokens(ids, 32, mode=mode, do_sample=False)
        assert tokens.shape == (2, 32)
        assert bool(((tokens >= model.config.video_offset)
                     & (tokens < model.config.vocab_size)).all())
        again = FastGenerator(model, weight_dtype=torch.bfloat16, act_dtype=torch.bfloat16)
        assert torch.equal(again.generate_tokens(ids, 32, mode=mode, do_sample=False), tokens)
    used = [p for s in gen._steps.values() for p in s.runner._programs.values() if p]
    assert used, "the decode steps did not run as DecodePrograms"


@pytest.mark.usefixtures("path")
def test_cli_flags(capsys, tmp_path):
    check_act_dtype_cli(capsys, tmp_path, "bfloat16", ("bfloat16",))


def test_info_names_the_bf16_path(capsys, path):
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bf16_activations"]["path"] == path
    assert main(["info"]) == 0
    assert f"bf16_activations: {path} (bfloat16 weights and activations" in \
        capsys.readouterr().out


@pytest.mark.usefixtures("path")
def test_custom_op_and_compile():
    """Pair-packed weights through the custom op: opcheck, and torch.compile's graph (with
    the LayerNorm prologue) computing what the eager call does."""
    x, w, b = _rand(3, 70, seed=7), _rand(50, 70, seed=8), _rand(50, seed=9)
    packed = pl.pack_weight(reference.quantize_weight(w, torch.bfloat16)[0], pairs=True)
    torch.library.opcheck(torch.ops.nbp.packed_linear.default, (x, packed, b, 50))
    norm = (_rand(70, seed=10), None, 1e-5)
    f = torch.compile(lambda x: pl.packed_linear(x, packed, b, 50, act="gelu", norm=norm),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), pl.packed_linear(x, packed, b, 50, act="gelu", norm=norm))
