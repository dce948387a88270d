"""Sampling at the edges: bad parameters are ValueErrors naming the argument, and
no logits (NaN, +-inf, ties, overflowing temperatures) make any sampler path
return an id outside the vocabulary; rows without a distribution are an error
naming the step."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbp.config import TransformerConfig
from nbp.generate import FastGenerator
from nbp.model import NBPTransformer
from nbp.reference import generate_tokens as reference_generate
from nbp.sampler import DRAWS, BatchedSampler, InvalidSteps
from nbp.sampling import MIN_TEMPERATURE, SamplingParams, guided_logits
from nbp_kernels import reference, sample_cpu, sample_torch
from nbp_kernels.sample_torch import _inverse_cdf

INF, NAN = float("inf"), float("nan")
BACKENDS = ["torch"] + (["cpu"] if sample_cpu.is_available()[0] else [])
CUDA = torch.cuda.is_available()


# --- parameters --------------------------------------------------------------------

@pytest.mark.parametrize("bad, name", [
    (dict(cfg_scale=NAN), "cfg_scale"), (dict(cfg_scale=INF), "cfg_scale"),
    (dict(cfg_scale="2"), "cfg_scale"), (dict(cfg_scale=True), "cfg_scale"),
    (dict(cfg_scale=-1.0), "cfg_scale"),
    (dict(temperature=1e-45), "temperature"), (dict(temperature=NAN), "temperature"),
    (dict(temperature=INF), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(temperature=MIN_TEMPERATURE / 2), "temperature"),
    (dict(top_k=True), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_k=0), "top_k"),
    (dict(top_p=True), "top_p"), (dict(top_p=NAN), "top_p"), (dict(top_p="0.5"), "top_p"),
    (dict(top_p=0.0), "top_p"), (dict(do_sample=1), "do_sample"),
    (dict(do_sample="yes"), "do_sample"), (dict(cfg_schedule=["linear"]), "cfg_schedule"),
])
def test_bad_sampling_params_name_the_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_params_are_stored_as_python_numbers():
    import numpy as np
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), top_p=1, cfg_scale=2)
    assert (p.temperature, p.top_k, p.top_p, p.cfg_scale) == (0.5, 3, 1.0, 2.0)
    assert type(p.top_k) is int and type(p.top_p) is float and type(p.cfg_scale) is float


def tiny_model(seed: int = 0) -> NBPTransformer:
    torch.manual_seed(seed)
    return NBPTransformer(TransformerConfig.from_preset("tiny")).eval()


def video_ids(cfg: TransformerConfig, batch: int = 1) -> torch.Tensor:
    return torch.full((batch, cfg.block_size), cfg.video_offset)


@pytest.mark.parametrize("generate", ["fast", "reference"])
@pytest.mark.parametrize("bad, name", [(dict(generator=123), "generator"),
                                       (dict(top_k=True), "top_k"),
                                       (dict(cfg_scale="2"), "cfg_scale"),
                                       (dict(temperature=1e-45), "temperature")])
def test_generators_reject_bad_sampling_arguments(generate, bad, name):
    model = tiny_model()
    ids = video_ids(model.config)
    with pytest.raises(ValueError, match=name):
        if generate == "fast":
            FastGenerator(model).generate_tokens(ids, model.config.block_size, **bad)
        else:
            reference_generate(model, ids, model.config.block_size, **bad)


# --- adversarial logits: every sampler path ---------------------------------------------

SPECIAL = st.sampled_from([NAN, INF, -INF, 0.0, 1.0, -1.0, 1e30, -1e30, 3e38, 1e-30])
VALUE = st.one_of(SPECIAL, st.floats(-50, 50, width=32))


@st.composite
def cases(draw):
    V = draw(st.integers(1, 40))
    rows = draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["mixed", "equal", "single", "nan_row", "finite"]))
    if kind == "finite":
        x = torch.tensor(draw(st.lists(st.floats(-50, 50, width=32), min_size=rows * V,
                                       max_size=rows * V))).view(rows, V)
    else:
        x = torch.tensor(draw(st.lists(VALUE, min_size=rows * V, max_size=rows * V)),
                         dtype=torch.float32).view(rows, V)
    if kind == "equal":
        x = torch.full((rows, V), draw(SPECIAL))
    elif kind == "single":                    # one finite value, the rest -inf
        x = torch.full((rows, V), -INF)
        x[:, draw(st.integers(0, V - 1))] = draw(st.floats(-50, 50, width=32))
    elif kind == "nan_row":
        x[draw(st.integers(0, rows - 1))] = NAN
    params = SamplingParams(
        do_sample=draw(st.booleans()),
        temperature=draw(st.sampled_from([MIN_TEMPERATURE, 0.01, 0.5, 1.0, 3.0, 1e4, 1e30])),
        top_k=draw(st.one_of(st.none(), st.integers(1, 45))),
        top_p=draw(st.one_of(st.none(), st.sampled_from([1e-9, 0.3, 0.9, 1.0]))),
        cfg_scale=draw(st.one_of(st.none(), st.sampled_from([0.0, 1.5, 1e30]))))
    draw_kind = draw(st.sampled_from(DRAWS))
    backend = draw(st.sampled_from(BACKENDS))
    return x[:, None], params, draw_kind, backend     # logits [rows, n=1, V]


def check_step(logits: torch.Tensor, params: SamplingParams, draw_kind: str, backend: str,
               seed: int) -> None:
    """Every token is in [0, V); the flag says exactly whether a row had no distribution;
    a flagged-valid row's token is one the oracle keeps (greedy: the argmax)."""
    weight = None
    if params.cfg_scale is not None:
        logits = torch.cat([logits, logits.flip(-1)])
        weight = torch.tensor(params.cfg_scale, dtype=torch.float64, device=logits.device)
    sampler = BatchedSampler(params, draw_kind, backend)
    rows = logits.shape[0] // (2 if weight is not None else 1)
    g = torch.Generator(logits.device).manual_seed(seed)
    noise = sampler.noise(rows, g, logits.device) if sampler.needs_noise else None
    tokens, invalid = sampler(logits, weight, noise, g)
    V = logits.shape[-1]
    assert tokens.shape == (rows, 1) and tokens.dtype == torch.int64
    assert ((tokens >= 0) & (tokens < V)).all(), tokens
    x = guided_logits(logits, params, weight).reshape(rows, V).cpu()
    bad = ~torch.isfinite(x.amax(-1))
    assert bool(invalid) == bool(bad.any())
    t = tokens.flatten().cpu()
    for r in torch.nonzero(~bad).flatten().tolist():
        if not params.do_sample:
            assert t[r] == x[r].argmax()
            continue
        k = V if params.top_k is None else min(params.top_k, V)
        tau, _ = reference.keep_threshold(x[r:r + 1], k, params.top_p or 1.0)
        assert x[r, t[r]] >= tau[0, 0] and math.isfinite(x[r, t[r]]), (x[r], t[r], tau)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), seed=st.integers(0, 2 ** 16))
def test_sampler_never_leaves_the_vocabulary(case, seed):
    logits, params, draw_kind, backend = case
    check_step(logits, params, draw_kind, backend, seed)


@pytest.mark.parametrize("rows, V, top_k", [(2, 300, 300), (3, 600, 5)])
def test_inverse_cdf_stays_in_the_vocabulary(rows, V, top_k):
    """u at the top of [0, 1), empty trailing chunks and the zero padding, NaN, inf and
    all-zero weights: always an index in [0, V), the last positive one at the top."""
    w = torch.zeros(rows, V)
    w[:, :top_k] = torch.rand(rows, top_k) + 1e-3     # the chunks after the kept ones are empty
    hi = torch.full((rows,), 1.0 - 2.0 ** -53, dtype=torch.float64)
    assert (_inverse_cdf(w, hi) == top_k - 1).all()
    for poison in (NAN, INF):
        bad = w.clone()
        bad[0, 1] = poison
        out = _inverse_cdf(bad, torch.rand(rows, dtype=torch.float64))
        assert ((out >= 0) & (out < V)).all()
    out = _inverse_cdf(torch.zeros(rows, V), hi)
    assert ((out >= 0) & (out < V)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("draw_kind", DRAWS)
def test_issue_case_nan_rows_of_a_1013_word_vocabulary(backend, draw_kind):
    """The reported case: NaN rows once drew id 1023 from a vocabulary of 1013."""
    x = torch.randn(4, 1, 1013)
    x[1], x[3, 0, 5] = NAN, INF
    sampler = BatchedSampler(SamplingParams(top_k=50, top_p=0.9), draw_kind, backend)
    g = torch.Generator().manual_seed(0)
    tokens, invalid = sampler(x, None, sampler.noise(4, g, torch.device("cpu")), g)
    assert bool(invalid) and ((tokens >= 0) & (tokens < 1013)).all()


def test_invalid_steps_name_the_first_bad_step():
    eager = InvalidSteps(4, torch.device("cpu"))
    eager.record(0, torch.tensor(False))
    with pytest.raises(ValueError, match="step 1 "):
        eager.record(1, torch.tensor(True))


@pytest.mark.parametrize("generate", ["fast", "fast-multinomial", "reference"])
def test_nan_logits_are_an_error_naming_the_step(generate):
    """Every embedding but the prompt's is NaN: the prefill's step 0 is fine, step 1
    (fed the tokens step 0 drew) is not."""
    model = tiny_model()
    cfg = model.config
    ids = video_ids(cfg)
    with torch.no_grad():
        keep = model.tok_emb.weight[cfg.video_offset].clone()
        model.tok_emb.weight.fill_(NAN)
        model.tok_emb.weight[cfg.video_offset] = keep
    kw = dict(top_k=5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="step 1 "):
        if generate == "reference":
            reference_generate(model, ids, 3 * cfg.block_size, **kw)
        else:
            draw = "multinomial" if generate.endswith("multinomial") else "fast"
            FastGenerator(model, draw=draw).generate_tokens(ids, 3 * cfg.block_size, **kw)


# --- the CUDA path -------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), seed=st.integers(0, 2 ** 16))
def test_cuda_sampler_never_leaves_the_vocabulary(case, seed):
    logits, params, draw_kind, _ = case
    check_step(logits.cuda(), params, draw_kind, "torch", seed)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("draw", DRAWS)
def test_cuda_graph_steps_flag_nan_after_the_loop(draw):
    """The graph-captured decode loop does not synchronise per step; the flag it
    leaves on the device still names step 1."""
    model = tiny_model()
    cfg = model.config
    with torch.no_grad():
        keep = model.tok_emb.weight[cfg.video_offset].clone()
        model.tok_emb.weight.fill_(NAN)
        model.tok_emb.weight[cfg.video_offset] = keep
    gen = FastGenerator(model, device="cuda", draw=draw)
    with pytest.raises(ValueError, match="step 1 "):
        gen.generate_tokens(video_ids(cfg).cuda(), 3 * cfg.block_size, top_k=5,
                            generator=torch.Generator("cuda").manual_seed(0))
    ok = tiny_model()
    tokens = FastGenerator(ok, device="cuda", draw=draw).generate_tokens(
        video_ids(cfg).cuda(), 3 * cfg.block_size, temperature=MIN_TEMPERATURE,
        generator=torch.Generator("cuda").manual_seed(0))
    assert ((tokens >= 0) & (tokens < cfg.vocab_size)).all()


@pytest.mark.parametrize("kind", ["normal", "ties", "neg_inf", "equal"])
@pytest.mark.parametrize("V", [1, 7, 300, 1000])
def test_sample_torch_equals_the_reference(kind, V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(4, V, generator=g) * 2
    if kind == "ties":
        x = x.round()
    elif kind == "neg_inf":
        x[:, 1::3] = -INF
    elif kind == "equal":
        x = torch.full((4, V), 0.25)
    u = torch.rand(4, dtype=torch.float64, generator=g)
    work = torch.full(sample_torch.work_shape(4, V), NAN)    # reused: stale contents must not leak
    for k, p in sorted({(1, 1.0), (max(1, V // 4), 0.6), (V, 0.3), (V, 1.0), (max(1, V - 1), 0.95)}):
        tau, m = sample_torch.keep_threshold(x, k, p, work=work)
        ref_tau, ref_m = reference.keep_threshold(x, k, p)
        assert torch.equal(m, ref_m) and torch.equal(tau, ref_tau), (k, p)
        want = reference.draw_kept(x, tau, m, u)
        assert torch.equal(sample_torch.draw_kept(x, tau, m, u), want)
        assert torch.equal(sample_torch.draw_kept(x, tau, m, u, work=work), want)
