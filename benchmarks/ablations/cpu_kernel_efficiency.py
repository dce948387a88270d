# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""How close each CPU decode kernel runs to this CPU's limits, timed alone at the K600 shapes.

Each kernel is called through its C entry point (ctypes, as ``cpu_kernel_ab.py`` calls
it: no Python wrapper in the time), the same call back to back, its data left in the
caches where it fits them ("hot"), and after a 256 MB read that evicts it ("cold", as a
decode step finds it). Each row
reports the median time and the rate against the limits measured in the same run: its
multiply-adds over the register-only peak (``cpu_peak.py``: float32 FMAs, or int8 dot
products for int8 rows) and its bytes over the read bandwidth
(``cpu_k600_isa_dtype.read_bandwidth``). A kernel near both limits cold has no headroom
on this machine; one far below them hot has some in its own code.

Rows (K600: 6 layers x 384, vocabulary 64000): each product of a decode layer (q, k and
v stacked) and the vocabulary head, float32 packed linears at 16 rows and 1, and the same
with int8 weights and int8 rows (the int8_linear path in force); the decode attention of a step (6
layers x 6 heads x 64, 16 queries against 900 cached positions); the sampler's draw over
16 rows (top-k 16000, top-p 0.9; no multiply-add peak); a prefill's float32 layer
products at 512 rows through oneDNN (``prefill_gemm``).

Writes benchmarks/results/cpu_kernel_efficiency_<threads>t_<machine><tag>.json.

    python benchmarks/ablations/cpu_kernel_efficiency.py --threads 2
    NBP_CPU_ISA=avx2 python benchmarks/ablations/cpu_kernel_efficiency.py --tag _avx2
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from ablation_args import add_cpu_run_args, write_result
from cpu_k600_isa_dtype import read_bandwidth
from cpu_kernel_ab import attention_step, call, int8_call
from cpu_peak import peaks
from nbp.commands.bench import machine_info, machine_tag
from nbp_kernels import decode_attention_cpu, int8_linear, packed_linear, prefill_gemm, sample_cpu
from nbp_kernels.cpu_build import configure_threads, cpu_isa

RESULTS = Path(__file__).resolve().parents[1] / "results"
FLUSH_FLOATS = 64 << 20   # 256 MB, more than any last-level cache here
# a K600 decode layer's products (q, k and v stacked, as the step runs them) and the head
SHAPES = {"qkv 384->1152": (384, 1152), "proj 384->384": (384, 384),
          "fc1 384->1536": (384, 1536), "fc2 1536->384": (1536, 384),
          "head 384->64000": (384, 64000)}


def timed(fn, repeats: int, flush: torch.Tensor | None, warm) -> list[float]:
    """Seconds of ``repeats`` calls of fn after two untimed ones; with ``flush``, each call
    after a read of it and a call of ``warm`` (not timed)."""
    fn()
    fn()
    out = []
    for _ in range(repeats):
        if flush is not None:
            flush.sum()
            warm()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def row(what: str, fn, warm, repeats: int, flush, macs: float, nbytes: float, peak_per_s,
        bandwidth: float, unit: str) -> dict:
    """One kernel's row: hot and cold medians, its multiply-add rate against ``peak_per_s``
    (multiply-adds a second, None: no peak for it) and its byte rate against ``bandwidth``.
    warm: the same kernel on other, small data, called between the flush and a cold call:
    the flush leaves the OpenMP workers asleep and the kernel's code out of cache, which a
    decode step, its kernels back to back, never does (a one-row 384 x 384 product took
    ~140 us cold without it, ~55 with it, 8 hot, on the Zen 4)."""
    hot = statistics.median(timed(fn, repeats, None, warm))
    cold = statistics.median(timed(fn, repeats, flush, warm))
    out = {"what": what, "hot_ms": hot * 1e3, "cold_ms": cold * 1e3, "macs": macs,
           "bytes": nbytes, "rate_unit": unit}
    for name, t in (("hot", hot), ("cold", cold)):
        out[f"{name}_rate"] = macs / t / 1e9 * (2 if unit == "GFLOP/s" else 1)
        out[f"{name}_of_peak"] = macs / t / peak_per_s if peak_per_s else None
        out[f"{name}_of_bandwidth"] = nbytes / t / bandwidth
    print(f"{what:<42} hot {hot * 1e3:7.3f} ms cold {cold * 1e3:7.3f} ms   "
          + (f"of peak {out['hot_of_peak']:5.0%} / {out['cold_of_peak']:5.0%}   "
             if peak_per_s else " " * 27)
          + f"of bandwidth {out['hot_of_bandwidth']:5.0%} / {out['cold_of_bandwidth']:5.0%}")
    return out


def linear_rows(repeats: int, flush, peak: dict, bandwidth: float) -> list[dict]:
    """Each linear of a decode step alone (``SHAPES``), float32 weights and int8 weights with
    int8 rows, at 16 rows and 1."""
    torch.manual_seed(0)
    lib = packed_linear._load()[0]
    i8_lib, path = int8_linear._load()[0], int8_linear.kernel_path()[0]
    int8_peak = peak["int8_gmacs"] * 1e9 if peak["int8_gmacs"] and path and "vnni" in path \
        else None
    out, tiny = [], [torch.nn.Linear(64, 64)]
    for name, (fan_in, fan_out) in SHAPES.items():
        mods, weights = [torch.nn.Linear(fan_in, fan_out)], fan_in * fan_out
        for rows in (16, 1):
            out.append(row(f"float32 {name}, {rows} rows", call(lib, mods, torch.float32, rows),
                           call(lib, tiny, torch.float32, rows), repeats, flush,
                           rows * weights, 4 * weights,
                           peak["fp32_gflops"] * 1e9 / 2, bandwidth, "GFLOP/s"))
            if i8_lib is not None and path is not None:
                out.append(row(f"int8 {name}, int8 rows ({path}), {rows} rows",
                               int8_call(i8_lib, mods, torch.int8, rows, path),
                               int8_call(i8_lib, tiny, torch.int8, rows, path), repeats, flush,
                               rows * weights, weights, int8_peak, bandwidth, "GMAC/s"))
    return out


def attention_row(repeats: int, flush, peak: dict, bandwidth: float) -> dict:
    """One decode step's attention: 6 layers x 6 heads x 64, 16 queries, 900 cached."""
    lib = decode_attention_cpu.load("decode_attention", decode_attention_cpu._bind)[0]
    pairs, keys, d, q = 36, 900 + 16, 64, 16
    return row("decode attention, 16 queries, 900 cached", attention_step(lib, q),
               attention_step(lib, q, cached=16, n_layer=1, capacity=64), repeats, flush, 2 * pairs * keys * d * q, 2 * pairs * keys * d * 4,
               peak["fp32_gflops"] * 1e9 / 2, bandwidth, "GFLOP/s")


def sampler_row(repeats: int, flush, bandwidth: float) -> dict:
    """The draw over 16 rows of 64000 logits (normal, the spread of a K600 model's)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 64000, generator=g) * 0.4
    u = torch.rand(16, dtype=torch.float64, generator=g)
    work = torch.empty(sample_cpu.work_shape(16, 64000))
    small, small_work = logits[:, :4096].contiguous(), torch.empty(sample_cpu.work_shape(16, 4096))
    return row("sampler, 16 rows x 64000, top-k 16000, top-p 0.9",
               lambda: sample_cpu.sample(logits, 16000, 0.9, u, work=work),
               lambda: sample_cpu.sample(small, 1000, 0.9, u, work=small_work), repeats, flush,
               0, logits.numel() * 4, None, bandwidth, "GFLOP/s")


def prefill_rows(repeats: int, flush, peak: dict, bandwidth: float) -> list[dict]:
    """A 512-row prefill's layer products (one of each shape) through ``prefill_gemm``."""
    g = torch.Generator().manual_seed(0)
    out, tiny = [], (torch.randn(64, 64, generator=g), torch.randn(512, 64, generator=g))
    for fan_in, fan_out in ((384, 1152), (384, 384), (384, 1536), (1536, 384)):
        w, x = torch.randn(fan_out, fan_in, generator=g), torch.randn(512, fan_in, generator=g)
        b = torch.randn(fan_out, generator=g)
        out.append(row(f"prefill {fan_in}->{fan_out}, 512 rows ({prefill_gemm.route()[0]})",
                       lambda w=w, x=x, b=b: prefill_gemm.linear(x, w, b, None, None),
                       lambda: prefill_gemm.linear(tiny[1], tiny[0], None, None, None), repeats,
                       flush, 512 * fan_in * fan_out, 4 * (fan_in * fan_out + 512 * fan_in),
                       peak["fp32_gflops"] * 1e9 / 2, bandwidth, "GFLOP/s"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cpu_run_args(p, RESULTS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats: expected positive ints")
    configure_threads(args.threads)
    isa, why = cpu_isa()
    if isa == "off":
        p.error(f"no CPU kernels run here: {why}")
    load = os.getloadavg()[0]
    peak, bandwidth = peaks(args.threads, isa), read_bandwidth()
    print(f"{isa}: fp32 {peak['fp32_gflops']:.0f} GFLOP/s, int8 {peak['int8_gmacs'] or 0:.0f} "
          f"GMAC/s, read {bandwidth / 1e9:.1f} GB/s")
    flush = torch.ones(FLUSH_FLOATS)
    rows = (linear_rows(args.repeats, flush, peak, bandwidth)
            + [attention_row(args.repeats, flush, peak, bandwidth),
               sampler_row(args.repeats, flush, bandwidth)]
            + prefill_rows(args.repeats, flush, peak, bandwidth))
    peak_after, bandwidth_after = peaks(args.threads, isa), read_bandwidth()
    info = dict(machine_info("cpu"), isa=isa, isa_reason=why, load_avg_1m=load,
                load_avg_1m_after=os.getloadavg()[0])
    result = {"what": __doc__.split("\n\n")[0], "machine": info, "repeats": args.repeats,
              "peak": peak, "peak_after": peak_after, "read_bandwidth_GBps": bandwidth / 1e9,
              "read_bandwidth_after_GBps": bandwidth_after / 1e9, "rows": rows}
    write_result(args.out / f"cpu_kernel_efficiency_{args.threads}t_{machine_tag(info)}"
                            f"{args.tag}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
