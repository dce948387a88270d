"""The CPU sampler: sample_cpu's C kernels vs the numpy/torch path (pytest-benchmark).

    pytest benchmarks/bench_sample_cpu.py --benchmark-only

One ``BatchedSampler`` call (filter + fast draw) on the rows of one NTP step
(1) and one NBP step (16) of the K600 model of issue 4: vocabulary 64000,
top-k 16000, top-p 0.9, float32 logits with the spread of the random-weight
model's (std 0.4). Compare within a group; absolute times hold for the
machine they were taken on.
"""
import pytest
import torch

from nbp.sampler import BatchedSampler
from nbp.sampling import SamplingParams
from nbp_kernels import sample_cpu

VOCAB, TOP_K, TOP_P = 64000, 16000, 0.9


@pytest.mark.parametrize("impl", ["cpu", "torch"])
@pytest.mark.parametrize("rows", [1, 16])
def test_sampler_step(benchmark, impl, rows):
    if impl == "cpu" and not sample_cpu.is_available()[0]:
        pytest.skip(f"sample_cpu unusable here: {sample_cpu.is_available()[1]}")
    benchmark.group = f"sampler {rows}x{VOCAB} top-k {TOP_K} top-p {TOP_P} " \
                      f"threads={torch.get_num_threads()}"
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=g) * 0.4
    sampler = BatchedSampler(SamplingParams(top_k=TOP_K, top_p=TOP_P), backend=impl)
    u = sampler.noise(rows, g, torch.device("cpu"))
    sampler(logits, None, u)
    benchmark.pedantic(sampler, args=(logits, None, u), rounds=60, iterations=1)
