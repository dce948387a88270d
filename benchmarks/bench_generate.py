"""Generation (pytest-benchmark): ``FastGenerator`` NBP and NTP vs the published-style baseline.

    pytest benchmarks/bench_generate.py --benchmark-only

K600-style frame prediction on random weights: 2 given latent frames, the
other 3 generated (768 tokens on the 5x16x16 grid), top-k / top-p sampling.
CUDA runs k600-base (24 layers x 1536, vocabulary 64000, L = 16, bf16) at
batch 1 and 8; a CPU a small float32 model on the same token layout (2 layers
x 256, vocabulary 8192) at batch 1. The baseline
(``benchmarks/ablations/baseline.py``) runs the same weights the way the
published sampler does. Bytes: every weight read once per decode step (the
lower bound of a step); FLOPs: 2 x parameters per generated token.
The CPU acceptance measurement at the K600 size is
``benchmarks/ablations/ntp_vs_nbp.py``.
"""
import pytest
import torch

from ablations.baseline import generate_tokens as baseline_generate
from nbp.commands.bench import bench_config, random_model
from nbp.generate import FastGenerator
from suite import CUDA, DEVICE, DTYPE, record, run, smoke

PRESET = "tiny" if smoke() else "k600-base"
SIZE = {} if CUDA or smoke() else dict(layers=2, width=256, vocab=8192)
BATCHES = (1, 8) if CUDA and not smoke() else (1,)
SAMPLING = dict(top_k=16000, top_p=0.9) if CUDA else dict(top_k=2048, top_p=0.9)
GIVEN_LATENT_FRAMES = 2


@pytest.fixture(scope="module")
def model():
    with torch.device(DEVICE):  # initialise on the device: the 700M model's CPU init takes minutes
        return random_model(bench_config(PRESET, **SIZE), device=DEVICE, dtype=DTYPE)


def _task(model, batch: int):
    """(given ids [batch, given] int64, number of new tokens) of frame prediction on the latent grid."""
    cfg = model.config
    t, h, w = cfg.latent_shape
    given, new = GIVEN_LATENT_FRAMES * h * w, (t - GIVEN_LATENT_FRAMES) * h * w
    g = torch.Generator(DEVICE).manual_seed(0)
    return torch.randint(0, cfg.codebook_size, (batch, given), device=DEVICE, generator=g), new


def _record(benchmark, floors, model, impl: str, mode: str, batch: int, new: int) -> None:
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    steps = new // cfg.block_size if mode == "nbp" else new
    record(benchmark, floors, op="generate_tokens", impl=impl, mode=mode, batch=batch, new_tokens=new,
           steps=steps, shape=f"{PRESET} {cfg.n_layer}x{cfg.n_embd} vocab {cfg.vocab_size} L{cfg.block_size} "
                             f"B{batch} new{new}",
           dtype=DTYPE, nbytes=steps * params * torch.finfo(DTYPE).bits // 8, flops=2 * params * batch * new)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        frames = (cfg.latent_shape[0] - GIVEN_LATENT_FRAMES) * 4  # the tokenizer's 4x time factor
        benchmark.extra_info.update(tokens_per_s=batch * new / stats.stats.median,
                                    frames_per_s=batch * frames / stats.stats.median)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", ["nbp", "ntp"])
def test_generate_tokens_fast_generator(benchmark, floors, model, mode, batch):
    benchmark.group = f"generate_tokens {PRESET} B{batch} {DTYPE}"
    gen = FastGenerator(model, device=DEVICE)
    ids, new = _task(model, batch)
    run(benchmark, lambda: gen.generate_tokens(ids, new, mode=mode, **SAMPLING), 3)
    _record(benchmark, floors, model, "fast_generator", mode, batch, new)


@pytest.mark.parametrize("mode", ["nbp", "ntp"])
def test_generate_tokens_published_baseline(benchmark, floors, model, mode):
    benchmark.group = f"generate_tokens {PRESET} B1 {DTYPE}"
    ids, new = _task(model, 1)
    run(benchmark, lambda: baseline_generate(model, ids, new, mode=mode, **SAMPLING), 2 if mode == "nbp" else 1)
    _record(benchmark, floors, model, "published_baseline", mode, 1, new)
