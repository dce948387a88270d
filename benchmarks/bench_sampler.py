"""The sampler (pytest-benchmark): ``BatchedSampler`` vs a per-token loop, one decode step's rows.

    pytest benchmarks/bench_sampler.py --benchmark-only

One top-k 16000 / top-p 0.9 draw for the rows of one NTP step (1) and one
NBP step (16) over a 64000-word vocabulary (the K600 shape), with logits of
the random-weight model's spread (std 0.4) and of a peaked model's (std 3: the
top-p mass sits in a few hundred tokens): ``BatchedSampler`` as
``FastGenerator`` runs it (on CPU its C kernels, ``nbp_kernels.sample_cpu``,
when usable: threshold and draw in one call), the same with the C kernels
turned off (``nbp_kernels.registry.forced``), and the published-style loop
(filter + softmax + multinomial per token, std 0.4 only: ~1 s a call). Bytes:
the logits read once.
"""
import contextlib

import pytest
import torch

import nbp_kernels.registry
from nbp.sampler import BatchedSampler
from nbp.sampling import SamplingParams, filter_logits
from suite import DEVICE, nbytes, record, run, smoke

VOCAB, TOP_K, TOP_P = (512, 64, 0.9) if smoke() else (64000, 16000, 0.9)
ROWS = (1, 16)
IMPLS = ("batched_sampler", "batched_sampler_no_cpu_kernels", "per_token_loop")
CASES = [(impl, std) for impl in IMPLS for std in (0.4, 3.0)
         if impl != "per_token_loop" or std == 0.4]


def _torch_fallback(request) -> None:
    """Turn the sampler's C kernels off for this test (the registry's forcing)."""
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    stack.enter_context(nbp_kernels.registry.forced(keep_threshold="torch", draw_kept="torch"))


def _logits(rows: int, std: float) -> torch.Tensor:
    g = torch.Generator(DEVICE).manual_seed(0)
    return torch.randn(rows, VOCAB, device=DEVICE, generator=g) * std


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("impl, std", CASES)
def test_sampler(benchmark, floors, request, impl, std, rows):
    benchmark.group = (f"sampler {rows}x{VOCAB} std {std} top-k {TOP_K} top-p {TOP_P} "
                       f"threads={torch.get_num_threads()}")
    logits = _logits(rows, std)
    if impl == "per_token_loop":
        def fn():
            for i in range(rows):
                torch.multinomial(torch.softmax(filter_logits(logits[i:i + 1], TOP_K, TOP_P), dim=-1), 1)
    else:
        if impl == "batched_sampler_no_cpu_kernels":
            if DEVICE.type != "cpu":
                pytest.skip("the sampler's C kernels are CPU kernels")
            _torch_fallback(request)
        sampler = BatchedSampler(SamplingParams(top_k=TOP_K, top_p=TOP_P))
        u = sampler.noise(rows, torch.Generator(DEVICE).manual_seed(1), DEVICE)
        steps = logits[:, None]   # the sampler takes one step's raw logits [rows, n, V]
        fn = lambda: sampler(steps, noise=u)  # noqa: E731
    run(benchmark, fn, 10 if impl == "per_token_loop" else 40)  # the loop takes ~1 s per call at 16 rows
    record(benchmark, floors, op="sampler", impl=impl, shape=f"{rows}x{VOCAB}", dtype=logits.dtype,
           nbytes=nbytes(logits), flops=0, rows=rows, std=std, top_k=TOP_K, top_p=TOP_P)
