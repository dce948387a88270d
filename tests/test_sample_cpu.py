"""nbp_kernels.sample_cpu (the CPU sampler's C kernels) against nbp_kernels.reference."""
from __future__ import annotations

import pytest
import torch

from cpu_isa_paths import ISAS, force_isa
from nbp_kernels import reference
from nbp_kernels import sample_cpu as sc

@pytest.fixture(autouse=True, params=ISAS)
def isa(request, monkeypatch):
    return force_isa(monkeypatch, request.param, sc.is_available)


def logits(rows: int, V: int, seed: int, scale: float = 1.0, kind: str = "normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=g) * scale
    if kind == "ties":              # quantised: many exact ties, at the k-th value and the crossing
        x = x.round()
    elif kind == "two":             # two values only: a pivot band can hold the whole set
        x = (x > 0.7).float()
    elif kind == "equal":
        x = torch.full((rows, V), 0.25)
    elif kind == "sorted":          # sorted rows: the worst order for strided samples
        x = x.sort(dim=-1).values
    elif kind == "neg_inf":         # masked logits
        x[:, ::3] = float("-inf")
    return x


def assert_threshold(x: torch.Tensor, k: int, p: float):
    tau, m = sc.keep_threshold(x, k, p)
    ref_tau, ref_m = reference.keep_threshold(x, k, p)
    assert torch.equal(m, ref_m)
    assert torch.equal(tau, ref_tau), (k, p, tau.flatten()[:8], ref_tau.flatten()[:8])


# --- keep_threshold ---------------------------------------------------------------

@pytest.mark.parametrize("V", [1, 7, 17, 65, 300, 1000, 4097])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_keep_threshold_equals_reference(V, p, scale):
    x = logits(3, V, V, scale)
    for k in sorted({1, min(2, V), max(1, V // 3), max(1, V - 1), V}):
        assert_threshold(x, k, p)


@pytest.mark.parametrize("kind", ["ties", "two", "equal", "sorted", "neg_inf"])
@pytest.mark.parametrize("V", [70, 1000, 5000])
def test_keep_threshold_awkward_rows(kind, V):
    x = logits(4, V, 1, 2.0, kind)
    for k, p in [(1, 1.0), (V // 4, 1.0), (V // 4, 0.6), (V, 0.3), (V - 1, 0.95), (50, 0.999)]:
        assert_threshold(x, k, p)


def test_keep_threshold_k600_shape():
    x = logits(3, 64000, 2, 0.4)
    assert_threshold(x, 16000, 0.9)
    assert_threshold(x, 16000, 1.0)
    assert_threshold(x, 64000, 0.9)


def test_keep_threshold_strided_rows_and_work_reuse():
    big = logits(5, 1200, 3)
    x = big[:, 100:1100]                            # row stride 1200, not contiguous
    work = torch.empty(sc.work_shape(5, 1000))
    for _ in range(2):
        tau, m = sc.keep_threshold(x, 40, 0.8, work=work)
        ref = reference.keep_threshold(x.contiguous(), 40, 0.8)
        assert torch.equal(tau, ref[0]) and torch.equal(m, ref[1])
    cols = big[:, ::2]                              # stride 2 along the vocabulary: copied
    assert torch.equal(sc.keep_threshold(cols, 9, 0.7)[0], reference.keep_threshold(cols, 9, 0.7)[0])


def test_keep_threshold_empty_batch():
    tau, m = sc.keep_threshold(torch.zeros(0, 10), 3, 0.5)
    assert tau.shape == (0, 1) and m.shape == (0, 1)


def bad_row_logits(fill: str) -> torch.Tensor:
    """3 x 100 logits whose row 1 has no distribution: a NaN or +inf in it ("nan", "+inf"),
    or all of it -inf ("-inf row")."""
    x = logits(3, 100, 4)
    if fill == "-inf row":
        x[1] = float("-inf")
    else:
        x[1, 7] = float(fill)
    return x


@pytest.mark.parametrize("fill", ["nan", "+inf", "-inf row"])
def test_keep_threshold_rejects_rows_without_a_finite_max(fill):
    x = bad_row_logits(fill)
    with pytest.raises(ValueError, match="logits: a row"):
        sc.keep_threshold(x, 10, 0.9)


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.zeros(2, 5, dtype=torch.float64)), "logits: expected a torch.float32"),
    (dict(x=torch.zeros(5)), "logits: expected \\[N, V\\]"),
    (dict(x=torch.zeros(2, 0)), "logits: expected \\[N, V\\]"),
    (dict(k=0), "top_k: expected an int in \\[1, 5\\]"),
    (dict(k=6), "top_k: expected an int in \\[1, 5\\]"),
    (dict(k=2.0), "top_k"),
    (dict(p=0.0), "top_p: expected a number in \\(0, 1\\]"),
    (dict(p=1.5), "top_p"),
    (dict(p=True), "top_p"),
    (dict(work=torch.zeros(2, 10)), "work: expected shape"),
    (dict(work=torch.zeros(2, 42, dtype=torch.float64)), "work: expected a torch.float32"),
])
def test_keep_threshold_bad_arguments(bad, match):
    args = dict(x=torch.zeros(2, 5), k=2, p=0.5, work=None) | bad
    with pytest.raises(ValueError, match=match):
        sc.keep_threshold(args["x"], args["k"], args["p"], work=args["work"])


# --- draw_kept ----------------------------------------------------------------------

def midpoints(x, tau, m, tokens_per_row: int):
    """u at the middle of the CDF interval of some well-sized kept tokens, and those tokens."""
    w = torch.where(x >= tau, torch.exp(x.double() - m.double()), 0.0)
    cdf = torch.cumsum(w, -1)
    total = cdf[:, -1:]
    big = (w / total > 1e-4).nonzero()
    us, rows, want = [], [], []
    for r in range(x.shape[0]):
        cols = big[big[:, 0] == r, 1]
        for c in cols[torch.linspace(0, len(cols) - 1, tokens_per_row).long()].tolist():
            us.append(float((cdf[r, c] - w[r, c] / 2) / total[r, 0]))
            rows.append(r)
            want.append(c)
    return torch.tensor(us, dtype=torch.float64), torch.tensor(rows), torch.tensor(want)


@pytest.mark.parametrize("V", [5, 16, 255, 256, 257, 1000, 64000])
@pytest.mark.parametrize("k, p", [(None, 1.0), (3, 1.0), ("quarter", 0.9), (None, 0.5)])
def test_draw_kept_picks_the_token_whose_cdf_interval_holds_u(V, k, p):
    x = logits(3, V, V + 1, 1.5)
    k = V if k is None else (min(3, V) if k == 3 else max(1, V // 4))
    tau, m = reference.keep_threshold(x, k, p)
    u, rows, want = midpoints(x, tau, m, 6)
    got = sc.draw_kept(x[rows].contiguous(), tau[rows].contiguous(), m[rows].contiguous(), u)
    assert torch.equal(got, want)
    assert torch.equal(reference.draw_kept(x[rows], tau[rows], m[rows], u), want)


def test_draw_kept_random_u_equals_reference_and_keeps_only_kept_tokens():
    x = logits(64, 3000, 5, 2.0)
    tau, m = reference.keep_threshold(x, 700, 0.8)
    u = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    got = sc.draw_kept(x, tau, m, u)
    assert torch.equal(got, reference.draw_kept(x, tau, m, u))
    assert (x.gather(1, got[:, None]) >= tau).all()


def test_draw_kept_edges():
    V = 300                                   # not a multiple of the 256-token chunks
    x = torch.full((3, V), -5.0)
    x[:, 7], x[:, 260], x[:, 299] = 0.0, float(torch.log(torch.tensor(2.0))), 0.0
    tau, m = torch.full((3, 1), -1.0), torch.full((3, 1), float(x[0].max()))
    lo = torch.zeros(3, dtype=torch.float64)
    hi = torch.full((3,), 1.0 - 2.0 ** -53, dtype=torch.float64)
    mid = torch.full((3,), 0.5, dtype=torch.float64)
    assert sc.draw_kept(x, tau, m, lo).tolist() == [7] * 3
    assert sc.draw_kept(x, tau, m, hi).tolist() == [299] * 3
    assert sc.draw_kept(x, tau, m, mid).tolist() == [260] * 3     # cdf: 0.25, 0.75, 1.0
    one = torch.full((2, V), -1.0)
    one[:, 123] = 3.0
    u = torch.tensor([0.0, 0.999], dtype=torch.float64)
    assert sc.draw_kept(one, torch.full((2, 1), 3.0), torch.full((2, 1), 3.0), u).tolist() == [123] * 2


@pytest.mark.parametrize("bad, match", [
    (dict(u=torch.zeros(2)), "u: expected a torch.float64"),
    (dict(u=torch.zeros(3, dtype=torch.float64)), "u: expected shape \\(2,\\)"),
    (dict(tau=torch.zeros(2)), "tau: expected shape \\(2, 1\\)"),
    (dict(m=torch.zeros(2, 1, dtype=torch.float64)), "row_max: expected a torch.float32"),
    (dict(tau=torch.full((2, 1), 9.0)), "logits: a row has no kept token"),
    (dict(m=torch.full((2, 1), float("-inf"))), "row_max: expected finite values"),
])
def test_draw_kept_bad_arguments(bad, match):
    args = dict(x=torch.zeros(2, 5), tau=torch.zeros(2, 1), m=torch.zeros(2, 1),
                u=torch.zeros(2, dtype=torch.float64)) | bad
    with pytest.raises(ValueError, match=match):
        sc.draw_kept(args["x"], args["tau"], args["m"], args["u"])


# --- sample (keep_threshold and draw_kept in one call) -----------------------------

@pytest.mark.parametrize("kind", ["normal", "ties", "two", "equal", "sorted", "neg_inf"])
@pytest.mark.parametrize("V", [5, 300, 5000])
def test_sample_equals_threshold_then_draw(kind, V):
    x = logits(8, V, 7, 2.0, kind)
    u = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    for k, p in sorted({(1, 1.0), (max(1, V // 4), 1.0), (max(1, V // 4), 0.6), (V, 0.3),
                        (V, 1.0), (max(1, V - 1), 0.95)}):
        tau, m = reference.keep_threshold(x, k, p)
        got, bad = sc.sample(x, k, p, u)
        assert bad == 0
        assert torch.equal(got, reference.draw_kept(x, tau, m, u)), (kind, V, k, p)
        assert (x.gather(1, got[:, None]) >= tau).all()


@pytest.mark.parametrize("k, p", [(16000, 0.9), (16000, 1.0), (64000, 0.9)])
def test_sample_k600_shape_picks_the_token_whose_cdf_interval_holds_u(k, p):
    x = logits(16, 64000, 9, 3.0)
    tau, m = reference.keep_threshold(x, k, p)
    u, rows, want = midpoints(x, tau, m, 4)
    work = torch.empty(sc.work_shape(len(rows), 64000))
    got, bad = sc.sample(x[rows].contiguous(), k, p, u, work=work)
    assert bad == 0 and torch.equal(got, want)


@pytest.mark.parametrize("sampled", ["largest", "smallest"])
def test_sample_when_the_sampled_bracket_misses_the_kth_value(sampled):
    # the kernel brackets the k-th value with a strided sample of 512 logits
    # (cpu/sample_cpu.c, kth_bracket); holding the row's largest values, the bracket
    # lies above the k-th value (the whole row is compacted again), holding the
    # smallest, below it (the k-th is selected from the whole compact set)
    V = 6400
    x = logits(2, V, 10)
    at = torch.arange(512) * V // 512 + V // 1024
    x[:, at] = 10.0 + torch.arange(512.0) if sampled == "largest" else -10.0 - torch.arange(512.0)
    u = torch.tensor([0.3, 0.99], dtype=torch.float64)
    for k, p in [(1000, 0.5), (1000, 1.0), (3000, 0.9), (30, 1.0)]:
        tau, m = reference.keep_threshold(x, k, p)
        assert torch.equal(sc.sample(x, k, p, u)[0], reference.draw_kept(x, tau, m, u))
        assert torch.equal(sc.keep_threshold(x, k, p)[0], tau)


def test_sample_strided_rows_and_work_reuse():
    big = logits(5, 1200, 11)
    x = big[:, 100:1100]
    u = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    work = torch.full(sc.work_shape(5, 1000), float("nan"))   # stale contents must not leak
    tau, m = reference.keep_threshold(x.contiguous(), 40, 0.8)
    for _ in range(2):
        got, bad = sc.sample(x, 40, 0.8, u, work=work)
        assert bad == 0 and torch.equal(got, reference.draw_kept(x.contiguous(), tau, m, u))


@pytest.mark.parametrize("fill", ["nan", "+inf", "-inf row"])
def test_sample_flags_rows_without_a_distribution(fill):
    x = bad_row_logits(fill)
    u = torch.full((3,), 0.5, dtype=torch.float64)
    got, bad = sc.sample(x, 10, 0.9, u)
    assert bad == 1 and got[1] == -1
    keep = [0, 2]
    tau, m = reference.keep_threshold(x[keep], 10, 0.9)
    assert torch.equal(got[keep], reference.draw_kept(x[keep], tau, m, u[keep]))


def test_sample_empty_batch():
    got, bad = sc.sample(torch.zeros(0, 10), 3, 0.5, torch.zeros(0, dtype=torch.float64))
    assert got.shape == (0,) and bad == 0


@pytest.mark.parametrize("bad, match", [
    (dict(u=torch.zeros(2)), "u: expected a torch.float64"),
    (dict(u=torch.zeros(3, dtype=torch.float64)), "u: expected shape \\(2,\\)"),
    (dict(k=6), "top_k: expected an int in \\[1, 5\\]"),
    (dict(p=0.0), "top_p: expected a number in \\(0, 1\\]"),
    (dict(work=torch.zeros(2, 10)), "work: expected shape"),
])
def test_sample_bad_arguments(bad, match):
    args = dict(x=torch.zeros(2, 5), k=2, p=0.5, u=torch.zeros(2, dtype=torch.float64),
                work=None) | bad
    with pytest.raises(ValueError, match=match):
        sc.sample(args["x"], args["k"], args["p"], args["u"], work=args["work"])
