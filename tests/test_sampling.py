"""Sampling: nbp.sampling's oracle on hand-computed examples, and the batched
sampler of FastGenerator (nbp.sampler) with each of its kernels against it."""
from __future__ import annotations

import math

import pytest
import torch

from nbp.sampler import DRAWS, BatchedSampler, sampling_kernels
from nbp.sampling import SamplingParams, cfg_mix, cfg_weight, filter_logits, sample_logits
from nbp_kernels import reference, sample_cpu, sample_torch
from nbp_kernels.sample_torch import _inverse_cdf, _sorted_top

NEG = float("-inf")


@pytest.fixture(params=["cpu", "torch"])
def cpu_path(request):
    """The sampler backend under test: the CPU sampler's C kernels, or numpy/torch."""
    if request.param == "cpu" and not sample_cpu.is_available()[0]:
        pytest.skip(f"sample_cpu unavailable: {sample_cpu.is_available()[1]}")
    return request.param


def keep_threshold(x: torch.Tensor, top_k, top_p, backend: str = "torch") -> torch.Tensor:
    """tau [N, 1] of the backend's kernels (top_k / top_p None: not filtered)."""
    V = x.shape[-1]
    k, p = V if top_k is None else min(top_k, V), 1.0 if top_p is None else top_p
    return sampling_kernels(backend, x).keep_threshold(x, k, p)[0]


def kept(logits: torch.Tensor) -> list[bool]:
    return (logits > NEG).tolist()


# --- hand-computed examples ----------------------------------------------------

def test_top_k_keeps_ties_with_the_kth_value():
    x = torch.tensor([[5.0, 2.0, 2.0, 1.0, 2.0]])
    assert kept(filter_logits(x, top_k=2)) == [[True, True, True, False, True]]
    assert kept(filter_logits(x, top_k=1)) == [[True, False, False, False, False]]
    assert kept(filter_logits(x, top_k=5)) == [[True] * 5]


@pytest.mark.parametrize("p, expect", [(0.4, [True, False, False, False]),
                                       (0.7, [True, True, False, False]),
                                       (0.9, [True, True, True, False]),
                                       (1.0, [True, True, True, True])])
def test_top_p_keeps_the_crossing_token(p, expect):
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()   # cumulative 0.5, 0.8, 0.95, 1.0
    assert kept(filter_logits(x, top_p=p)) == [expect]
    assert (x >= reference.keep_threshold(x, 4, p)[0]).tolist() == [expect]


def test_top_k_then_top_p_renormalises_over_the_survivors():
    # top-2 of probs (0.4, 0.3, 0.2, 0.1) renormalise to (4/7, 3/7): p = 0.5 keeps one token
    x = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert kept(filter_logits(x, top_k=2, top_p=0.5)) == [[True, False, False, False]]
    assert (x >= keep_threshold(x, 2, 0.5)).tolist() == [[True, False, False, False]]
    # without top-k, 0.4 < 0.5 and the second token is the crossing one
    assert kept(filter_logits(x, top_p=0.5)) == [[True, True, False, False]]


def test_cfg_mix_and_schedule():
    cond, uncond = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert cfg_mix(cond, uncond, 2.0).tolist() == [3.0, -2.0]      # 3 * cond - 2 * uncond
    assert cfg_mix(cond, uncond, 0.0).tolist() == [1.0, 2.0]
    const = SamplingParams(cfg_scale=1.5)
    linear = SamplingParams(cfg_scale=1.5, cfg_schedule="linear")
    assert [cfg_weight(const, s) for s in (0, 3)] == [1.5, 1.5]
    assert [cfg_weight(linear, s) for s in (0, 3)] == [0.0, 4.5]


def test_sampler_applies_temperature_then_cfg():
    # rows: conditional then unconditional; greedy picks argmax of (1+t)c - t u
    logits = torch.tensor([[[1.0, 0.0, 0.5]], [[0.0, 2.0, 0.0]]])    # [2 rows, n=1, V=3]
    guided = BatchedSampler(SamplingParams(do_sample=False, cfg_scale=1.0))
    w = torch.tensor(1.0, dtype=torch.float64)
    # mixed = 2 * [1, 0, .5] - [0, 2, 0] = [2, -2, 1] -> 0; without CFG the cond row alone -> 0
    tokens, invalid = guided(logits, w)
    assert tokens.tolist() == [[0]] and not invalid
    greedy = BatchedSampler(SamplingParams(do_sample=False, temperature=3.0))
    assert greedy(logits)[0].tolist() == [[0], [1]]
    with pytest.raises(ValueError, match="cfg_weight"):
        greedy(logits, w)


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(top_p=1.5), dict(top_k=0),
                                 dict(temperature=0.0), dict(cfg_schedule="cosine")])
def test_bad_sampling_params_raise(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_bad_draw_and_missing_noise_raise():
    with pytest.raises(ValueError, match="draw"):
        BatchedSampler(SamplingParams(), draw="gumbel")
    with pytest.raises(ValueError, match="noise"):
        BatchedSampler(SamplingParams())(torch.zeros(2, 5))


# --- the fast threshold equals filter_logits -------------------------------------

@pytest.mark.parametrize("V", [7, 257, 1000])
@pytest.mark.parametrize("top_k, top_p", [(None, 0.9), (5, None), (5, 0.5), (100, 0.95),
                                          (3, 0.999), (None, 0.3)])
@pytest.mark.parametrize("scale", [0.1, 3.0])
def test_keep_threshold_equals_filter_logits(cpu_path, V, top_k, top_p, scale):
    x = torch.randn(6, V, generator=torch.Generator().manual_seed(V)) * scale
    tau = keep_threshold(x, top_k, top_p, cpu_path)
    assert torch.equal(x.masked_fill(x < tau, NEG), filter_logits(x, top_k, top_p))


def test_keep_threshold_top_k_with_many_ties(cpu_path):
    # quantised logits: the k-th value is tied many times; all ties are kept
    x = (torch.randn(8, 300, generator=torch.Generator().manual_seed(0)) * 2).round()
    for k in (1, 10, 77):
        tau = keep_threshold(x, k, None, cpu_path)
        assert torch.equal(x.masked_fill(x < tau, NEG), filter_logits(x, k))


def test_keep_threshold_keeps_every_tie_at_the_crossing_value(cpu_path):
    # one tie rule: the oracle keeps every token tied with the top-p crossing token too
    x = (torch.randn(8, 300, generator=torch.Generator().manual_seed(1)) * 2).round()
    tau = keep_threshold(x, 50, 0.6, cpu_path)
    assert torch.equal(x.masked_fill(x < tau, NEG), filter_logits(x, 50, 0.6))
    y = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0]])     # the crossing token is one of three ties
    assert kept(filter_logits(y, top_p=0.5)) == [[True, True, True, True, False]]


def test_multinomial_draw_equals_sample_logits_stream(cpu_path):
    x = torch.randn(12, 50, generator=torch.Generator().manual_seed(2))
    params = SamplingParams(top_k=20, top_p=0.8)
    ref = sample_logits(x, params, torch.Generator().manual_seed(5))
    sampler = BatchedSampler(params, draw="multinomial", backend=cpu_path)
    mine, invalid = sampler(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(ref, mine) and not invalid


# --- the fast draw samples the filtered distribution -------------------------------

@pytest.mark.parametrize("top_k, top_p, temperature", [(None, None, 1.0), (3, None, 1.0),
                                                       (None, 0.7, 1.0), (4, 0.9, 2.0)])
def test_fast_draw_matches_the_filtered_softmax(cpu_path, top_k, top_p, temperature):
    base = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    rows = 60000
    logits = base.expand(rows, 1, -1).contiguous()                # [rows, n=1, V]
    params = SamplingParams(top_k=top_k, top_p=top_p, temperature=temperature)
    sampler = BatchedSampler(params, backend=cpu_path)
    noise = sampler.noise(rows, torch.Generator().manual_seed(0), torch.device("cpu"))
    draws = sampler(logits, None, noise)[0].flatten()
    expect = torch.softmax(filter_logits(base[None] / temperature, top_k, top_p), -1)[0]
    freq = torch.bincount(draws, minlength=6).double() / rows
    sigma = (expect * (1 - expect) / rows).sqrt()
    assert (freq[expect == 0] == 0).all(), "a filtered token was drawn"
    assert ((freq - expect).abs() <= 5 * sigma + 1e-12).all(), (freq, expect)


@pytest.mark.parametrize("top_k, top_p", [(4, None), (4, 0.6), (None, 0.5), (2, None)])
def test_fast_draw_with_tied_logits_is_exact(cpu_path, top_k, top_p):
    # ties inside the top-k list, beyond it (the k-th value repeats) and at the top-p crossing
    base = torch.tensor([1.0, 2.0, 1.0, 0.5, 2.0, 1.0, 0.0, 1.0])
    rows = 80000
    sampler = BatchedSampler(SamplingParams(top_k=top_k, top_p=top_p), backend=cpu_path)
    noise = sampler.noise(rows, torch.Generator().manual_seed(1), torch.device("cpu"))
    draws = sampler(base.expand(rows, -1).contiguous(), None, noise)[0]
    tau = keep_threshold(base[None], top_k, top_p)
    expect = torch.softmax(base.masked_fill(base < tau[0], float("-inf")), -1)
    freq = torch.bincount(draws, minlength=8).double() / rows
    sigma = (expect * (1 - expect) / rows).sqrt()
    assert (freq[expect == 0] == 0).all(), "a filtered token was drawn"
    assert ((freq - expect).abs() <= 5 * sigma + 1e-12).all(), (freq, expect)


def test_inverse_cdf_edges_and_padding():
    V = 300                                   # not a multiple of the 256-wide chunks
    w = torch.zeros(3, V)
    w[:, 7], w[:, 260], w[:, 299] = 1.0, 2.0, 1.0
    lo = torch.zeros(3, dtype=torch.float64)
    hi = torch.full((3,), 1.0 - 2.0 ** -53, dtype=torch.float64)
    mid = torch.full((3,), 0.5, dtype=torch.float64)
    assert _inverse_cdf(w, lo).tolist() == [7] * 3
    assert _inverse_cdf(w, hi).tolist() == [299] * 3
    assert _inverse_cdf(w, mid).tolist() == [260] * 3       # cdf: 0.25, 0.75, 1.0


def test_fast_draw_is_seeded(cpu_path):
    x = torch.randn(4, 3, 100, generator=torch.Generator().manual_seed(0))
    sampler = BatchedSampler(SamplingParams(top_k=30, top_p=0.9), backend=cpu_path)

    def draw(seed):
        u = sampler.noise(12, torch.Generator().manual_seed(seed), torch.device("cpu"))
        return sampler(x, None, u)[0]
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert math.prod(draw(1).shape) == 12


def test_sorted_top_counts_ties_and_reuses_scratch():
    x = (torch.randn(16, 500, generator=torch.Generator().manual_seed(5)) * 2).round()
    work = torch.empty(sample_torch.work_shape(16, 500))
    for k in (1, 77, 500):                     # k = 1: a [N, 1] reversed view must still convert
        fresh = _sorted_top(x, k, None)
        fresh = fresh[0].clone(), fresh[1]
        reused = _sorted_top(x, k, work)
        assert torch.equal(fresh[0], reused[0]) and torch.equal(fresh[1], reused[1])
        top = torch.sort(x, dim=-1, descending=True).values[:, :k]
        assert torch.equal(fresh[0], top)
        ties = (x == top[:, -1:]).sum(-1, keepdim=True) - (top == top[:, -1:]).sum(-1, keepdim=True)
        assert torch.equal(fresh[1], ties)
        assert k == 500 or fresh[1].sum() > 0               # the rounding made ties


@pytest.mark.parametrize("draw", DRAWS)
def test_two_threads_equal_one_thread(cpu_path, draw):
    """sample_cpu shares a step's rows over torch's OpenMP threads: same tokens."""
    x = torch.randn(17, 3000, generator=torch.Generator().manual_seed(6)) * 3
    sampler = BatchedSampler(SamplingParams(top_k=900, top_p=0.8), draw=draw, backend=cpu_path)
    u = sampler.noise(17, torch.Generator().manual_seed(7), torch.device("cpu"))
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out[threads] = [sampler(x, None, u, torch.Generator().manual_seed(8))[0]
                            for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[2][0], out[1][0]) and torch.equal(out[2][1], out[1][1])
    assert torch.equal(out[2][0], out[2][1])                  # reused scratch: same draws
    tau = keep_threshold(x, 900, 0.8)
    assert (x.gather(1, out[2][0][:, None]) >= tau).all()     # only kept tokens drawn


def test_fast_cpu_draw_equals_the_torch_kernels_at_the_k600_shape():
    """With the C kernels, draw="fast" takes threshold and draw in one call
    (sample_cpu.sample): the tokens of the two-call numpy/torch path, guidance and
    temperature included."""
    if not sample_cpu.is_available()[0]:
        pytest.skip(f"sample_cpu unavailable: {sample_cpu.is_available()[1]}")
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 4, 64000, generator=g) * 2.5    # 2B rows (guidance) x n positions
    params = SamplingParams(top_k=16000, top_p=0.9, temperature=0.8, cfg_scale=2.0)
    weight = cfg_weight(params, 1)
    tokens = {}
    for backend in ("cpu", "torch"):
        sampler = BatchedSampler(params, backend=backend)
        u = sampler.noise(8, torch.Generator().manual_seed(10), torch.device("cpu"))
        tokens[backend], invalid = sampler(logits, weight, u)
        assert tokens[backend].shape == (2, 4) and not bool(invalid)
    assert torch.equal(tokens["cpu"], tokens["torch"])
