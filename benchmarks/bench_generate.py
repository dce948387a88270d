"""Generation benchmarks (pytest-benchmark): FastGenerator NBP vs NTP vs the
published-style baseline, one decode step, and the batched sampler.

    pytest benchmarks/bench_generate.py --benchmark-only

CUDA runs the k600-base shape (24 layers x 1536, vocab 64000, L = 16, bf16,
random weights, batch 1 and 8); CPU runs a small fp32 model on the K600 token
layout (2 layers x 256, vocab 8192) so the suite finishes quickly. The full
CPU acceptance measurement is benchmarks/ablations/ntp_vs_nbp.py.
"""
import pytest
import torch

from ablations.baseline import generate_tokens as baseline_generate
from harness import copy_bandwidth
from nbp.commands.bench import bench_config, frame_prediction_shape, random_model
from nbp.generate import FastGenerator
from nbp.sampler import BatchedSampler
from nbp.sampling import SamplingParams, filter_logits

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SIZE = {} if CUDA else dict(layers=2, width=256, vocab=8192)
BATCHES = (1, 8) if CUDA else (1,)
SAMPLING = dict(top_k=16000, top_p=0.9) if CUDA else dict(top_k=2048, top_p=0.9)


@pytest.fixture(scope="module")
def model():
    return random_model(bench_config("k600-base", **SIZE), device=DEVICE, dtype=DTYPE)


def _ids(cfg, batch):
    given, _ = frame_prediction_shape(cfg)
    return torch.randint(0, cfg.codebook_size, (batch, given), device=DEVICE,
                         generator=torch.Generator(DEVICE).manual_seed(0))


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _bench(benchmark, fn, rounds=3):
    def call():
        fn()
        _sync()
    call()   # warm up (and capture CUDA graphs)
    benchmark.pedantic(call, rounds=rounds, iterations=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", ["nbp", "ntp"])
def test_fast_generator(benchmark, model, mode, batch):
    gen = FastGenerator(model, device=DEVICE)
    ids = _ids(model.config, batch)
    _, new = frame_prediction_shape(model.config)
    benchmark.extra_info.update(mode=mode, batch=batch, new_tokens=new, device=str(DEVICE))
    _bench(benchmark, lambda: gen.generate_tokens(ids, new, mode=mode, **SAMPLING))


def test_baseline_nbp(benchmark, model):
    ids = _ids(model.config, 1)
    _, new = frame_prediction_shape(model.config)
    _bench(benchmark, lambda: baseline_generate(model, ids, new, mode="nbp", **SAMPLING), rounds=2)


@pytest.mark.parametrize("batch", BATCHES)
def test_decode_step(benchmark, model, batch):
    """One NBP decode step (L tokens) at the end of a K600-length sequence."""
    gen = FastGenerator(model, device=DEVICE)
    ids = _ids(model.config, batch)
    _, new = frame_prediction_shape(model.config)
    gen.generate_tokens(ids, new, do_sample=False)
    step = next(iter(gen._steps.values()))
    seq_lens = gen.cache.seq_lens
    end = seq_lens.clone()

    def one_step():
        seq_lens.copy_(end - step.n)
        step.run()
    _bench(benchmark, one_step, rounds=20)
    # memory floor: every weight and every cached key/value read once per step
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cache_bytes = 2 * gen.cache.k[:, :, :, :int(end.max())].numel() * gen.cache.k.element_size()
    floor_s = (weight_bytes + cache_bytes) / copy_bandwidth(DEVICE)
    benchmark.extra_info.update(weight_bytes=weight_bytes, cache_bytes=cache_bytes,
                                floor_ms=floor_s * 1e3,
                                step_over_floor=benchmark.stats.stats.median / floor_s)


@pytest.mark.parametrize("impl", ["batched", "per_token_loop"])
def test_sampler_one_block(benchmark, impl):
    """Top-k 16000 / top-p 0.9 draws for 16 rows of a 64000-word vocabulary."""
    logits = torch.randn(1, 16, 64000, device=DEVICE) * 2
    params = SamplingParams(top_k=16000, top_p=0.9)
    sampler = BatchedSampler(params)
    noise = sampler.noise(16, None, DEVICE)
    if impl == "batched":
        fn = lambda: sampler(logits, None, noise)   # noqa: E731
    else:
        def fn():
            for i in range(16):
                probs = torch.softmax(filter_logits(logits[:, i], 16000, 0.9), dim=-1)
                torch.multinomial(probs, 1)
    _bench(benchmark, fn, rounds=10)
