"""Shared pieces of the benchmark suite (``pytest benchmarks/``): device, shapes, floors, timing.

Shapes: on CUDA the published ones (k600-base: 16 heads x 96, 1280 tokens,
blocks of 16, bf16, batch 1 and 8); on a CPU small float32 ones so the whole
suite finishes in minutes; in smoke mode (``NBP_BENCH_SMOKE=1``, set by
``--benchmark-disable``) tiny ones, each body run once.

Floors: the machine's copy bandwidth (bytes/s, a large tensor copy) and matmul
rate (FLOP/s, a square matmul in the benchmark dtype), each measured once per
session (``conftest.py``). A benchmark records ``time_over_bytes_floor`` =
median time / (bytes it must move / copy bandwidth) and
``time_over_flops_floor`` = median time / (its FLOPs / matmul rate): 1.0 is
the floor, larger is slower.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
FLOORS: dict = {}  # this session's floors, filled once by conftest.py's ``floors`` fixture


def smoke() -> bool:
    """Tiny shapes, for a run that only checks that every benchmark body works."""
    return os.environ.get("NBP_BENCH_SMOKE", "0") == "1"


@dataclass(frozen=True)
class AttentionShape:
    """One attention workload: [batch, heads, seq, head_dim], blocks of ``block`` tokens."""
    heads: int
    head_dim: int
    seq: int
    block: int
    cond: int            # condition prefix tokens at the start of the prefill sequence
    decode_batches: tuple

    def describe(self, batch: int) -> str:
        return f"B{batch} H{self.heads} S{self.seq} D{self.head_dim} L{self.block} cond{self.cond}"


def attention_shape() -> AttentionShape:
    if smoke():
        return AttentionShape(heads=2, head_dim=32, seq=64, block=16, cond=16, decode_batches=(1,))
    if CUDA:  # k600-base: 16 heads x 96, 5x16x16 latent = 1280 tokens, L = 16
        return AttentionShape(heads=16, head_dim=96, seq=1280, block=16, cond=0, decode_batches=(1, 8))
    return AttentionShape(heads=4, head_dim=64, seq=256, block=16, cond=16, decode_batches=(1, 4))


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def rounds(n: int) -> int:
    """Timed rounds: ``n``, but 1 in smoke mode."""
    return 1 if smoke() else n


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a square matmul in ``dtype`` (median of a few): the machine's compute floor."""
    n = 256 if smoke() else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    return 2 * n ** 3 / _median_time(lambda: torch.mm(a, b), 3 if smoke() else 7)


def measure_floors(device: torch.device, dtype: torch.dtype) -> dict:
    """Copy bandwidth (bytes/s) and matmul rate (FLOP/s) of ``device``, measured now."""
    from harness import copy_bandwidth
    from nbp.commands.bench import machine_info

    nbytes = 1 << (22 if smoke() else 28)
    return dict(copy_bandwidth_bytes_per_s=copy_bandwidth(device, nbytes=nbytes, repeats=3 if smoke() else 10),
                matmul_flops_per_s=matmul_rate(device, dtype), matmul_dtype=str(dtype).replace("torch.", ""),
                machine=machine_info(device))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def record(benchmark, floors: dict, *, op: str, impl: str, shape, dtype: torch.dtype,
           nbytes: int, flops: int, **extra) -> None:
    """Put what a benchmark measured into ``extra_info``, with its ratios to the machine floors.

    ``nbytes``: bytes the work must at least read and write once; ``flops``:
    its useful floating-point operations (0: none defined).
    """
    info = benchmark.extra_info
    info.update(op=op, impl=impl, shape=str(shape), dtype=dtype_name(dtype), device=str(DEVICE),
                bytes=int(nbytes), flops=int(flops), **extra)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: nothing was timed
        return
    median = stats.stats.median
    bytes_floor = nbytes / floors["copy_bandwidth_bytes_per_s"]
    info.update(median_s=median, bytes_floor_s=bytes_floor, time_over_bytes_floor=median / bytes_floor)
    if flops:
        flops_floor = flops / floors["matmul_flops_per_s"]
        info.update(flops_floor_s=flops_floor, time_over_flops_floor=median / flops_floor)


def run(benchmark, fn, n_rounds: int, setup=None) -> None:
    """Warm up (compile, autotune, capture) outside the timing, then time ``n_rounds`` calls of ``fn``."""
    def call():
        fn()
        sync()
    call()
    benchmark.pedantic(call, setup=setup, rounds=rounds(n_rounds), iterations=1)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def backend_skip_reason(backend: str, op: str) -> str | None:
    """Why ``backend`` cannot be benchmarked for ``op`` here (None: it can)."""
    import nbp_kernels

    if backend not in nbp_kernels.available_backends(DEVICE):
        status = getattr(nbp_kernels, "backend_status", None)
        return f"backend {backend} unusable on {DEVICE}" + (f": {status(backend, DEVICE)[1]}" if status else "")
    # The interpreter is no speed measurement, but a smoke run checks the bodies with it.
    if backend == "triton" and DEVICE.type != "cuda" and not smoke():
        return "triton on CPU runs in the interpreter only: not a speed measurement"
    if backend == "cuda" and op == "block_causal_attention":
        return "the cuda backend has no prefill kernel"
    return None
