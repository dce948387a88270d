# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""K600 generation on the CPU per kernel ISA and weight dtype (issue 15's acceptance runs).

K600 frame-prediction shape (6 layers x 384, vocabulary 64000, 512 given + 768
new tokens, L = 16, top-k 16000, top-p 0.9, random weights), one process,
variants timed round-robin (``time_interleaved``; medians), the load average
recorded before and after each round. FastGenerator's defaults: on the CPU each
decode step is one ``DecodeProgram`` call (NBP and NTP alike).

``--part isa``: float32 weights; nbp NBP and nbp NTP with the kernels forced to
each ISA this CPU runs (``NBP_CPU_ISA``, switched per call), and the published
sampler (benchmarks/ablations/baseline.py, torch only: no ISA). Ratios per
ISA: baseline / NBP (target >= 5) and NTP / NBP (target >= 10), and NTP / NBP of the
decode steps alone (each generation less its first block: the prefill both share). An
NBP generation takes a tenth of an NTP one, so a burst of other load on this shared
machine skews one NBP timing far more: each round times ``--nbp-per-round`` (10) NBP
generations back to back, about one NTP generation's time, and takes their mean.

``--part dtype``: nbp NBP with float32, bfloat16 and int8 weights, and int8
weights with int16 or int8 activations (``int8_a16`` / ``int8_a8``: ``act_dtype=
torch.int16`` / ``torch.int8``, integer dot products), and bfloat16 weights with
bfloat16 activations (``bfloat16_abf16``: AVX512-BF16 dot products), on the native ISA (target: int8 >= 2x faster than float32),
each decode step timed (from the
step callback) against its memory floor: the bytes it must read (every linear's
weights at their dtype, plus the K and V cache up to the step's length) over
the read bandwidth measured in the same rounds (``read_bandwidth``: the faster of a
threaded sum and the packed linear's one-row stream, over 1 GiB) (target: within 1.3x).

    python benchmarks/ablations/cpu_k600_isa_dtype.py --part dtype --threads 2 --repeats 5
    python benchmarks/ablations/cpu_k600_isa_dtype.py --part isa --threads 2 --repeats 3

An AVX2-only CPU, stood for on an AVX-512 one: nbp's kernels forced to AVX2 and torch's
libraries held there too (the prefill's oneDNN or BLAS products, the published sampler's
torch ops), the caps recorded in the result's ``machine.isa_caps``:

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python benchmarks/ablations/cpu_k600_isa_dtype.py --part isa --isas avx2 --tag _avx2libs
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from baseline import generate_tokens as baseline_generate
from nbp.commands.bench import (bench_config, frame_prediction_shape, machine_info, machine_tag,
                                random_model, time_interleaved)
from nbp.generate import FastGenerator
from nbp_kernels import prefill_gemm
from nbp_kernels.packed_linear import packed_linear
from nbp_kernels.cpu_build import configure_threads, cpu_isa, supported_isas
from ablation_args import write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"
# name: (weight_dtype, act_dtype) of FastGenerator
DTYPES = {"float32": (None, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.int8, None),
          "int8_a16": (torch.int8, torch.int16), "int8_a8": (torch.int8, torch.int8),
          "bfloat16_abf16": (torch.bfloat16, torch.bfloat16)}
SAMPLING = {"top_k": 16000, "top_p": 0.9}


def k600_problem():
    """(config, random model, given ids int64 [1, 512], new tokens) of the K600 frame-prediction
    shape every CPU ablation times."""
    cfg = bench_config("k600-base", layers=6, width=384)
    given, new = frame_prediction_shape(cfg)
    ids = torch.randint(cfg.video_offset, cfg.video_offset + cfg.codebook_size, (1, given),
                        generator=torch.Generator().manual_seed(0))
    return cfg, random_model(cfg), ids, new


def with_isa(isa: str | None, fn):
    """fn run with ``NBP_CPU_ISA`` set to ``isa`` (None: unset, the native choice)."""
    def run():
        saved = os.environ.get("NBP_CPU_ISA")
        if isa is None:
            os.environ.pop("NBP_CPU_ISA", None)
        else:
            os.environ["NBP_CPU_ISA"] = isa
        try:
            return fn()
        finally:
            if saved is None:
                os.environ.pop("NBP_CPU_ISA", None)
            else:
                os.environ["NBP_CPU_ISA"] = saved
    return run


def read_bandwidth() -> float:
    """Bytes per second read from 1 GiB (one pass), the faster of two readers timed now: a
    threaded torch sum, and the float32 ``packed_linear`` kernel at one row over a 1 GiB
    weight (2 FLOPs per 4 bytes: it only streams, with its software prefetch). The torch
    sum alone read ~25% slower than the kernel here, which made an NTP step (one row)
    look faster than its floor."""
    if not hasattr(read_bandwidth, "buf"):
        read_bandwidth.buf = torch.ones(256 << 20)
        read_bandwidth.x = torch.randn(1, 4096)
    buf, x = read_bandwidth.buf, read_bandwidth.x
    t0 = time.perf_counter()
    buf.sum()
    t1 = time.perf_counter()
    packed_linear(x, buf.view(4096, 4096, 16), None, 65536)   # the same GiB as packed weights
    t2 = time.perf_counter()
    return buf.numel() * 4 / min(t1 - t0, t2 - t1)


def weight_bytes(model, weight_dtype) -> int:
    """Bytes of every linear's weights (and int8 scales) at ``weight_dtype``, plus biases."""
    item = {None: 4, torch.bfloat16: 2, torch.int8: 1}[weight_dtype]
    total = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * item + (m.out_features * 4 if weight_dtype == torch.int8 else 0)
            total += 0 if m.bias is None else m.bias.numel() * 4
    return total


def cache_bytes(cfg, positions: int) -> int:
    """K and V of every layer for ``positions`` positions (float32, batch 1)."""
    return 2 * cfg.n_layer * positions * cfg.n_embd * 4


def generation(gen, ids, new, mode, step_times=None, first_times=None):
    """A generation call; with ``step_times``, appends each decode step's (index, seconds);
    with ``first_times``, the seconds to the first block's tokens (the prefill and its draw)."""
    def run():
        last = [time.perf_counter()]

        def callback(s, _):
            now = time.perf_counter()
            if step_times is not None and s > 0:
                step_times.append((s, now - last[0]))
            if first_times is not None and s == 0:
                first_times.append(now - last[0])
            last[0] = now
        return gen.generate_tokens(ids, new, mode=mode, generator=torch.Generator().manual_seed(0),
                                   callback=callback, **SAMPLING)
    return run


def repeated(fn, n: int):
    """fn called n times in a row (one timed call of ``timed_rounds``)."""
    def run():
        for _ in range(n):
            fn()
    return run


def per_call(values: list, n: int) -> list:
    """The means of consecutive groups of n values (one group per timed call)."""
    return [statistics.fmean(values[i:i + n]) for i in range(0, len(values) - n + 1, n)]


def simd_isas() -> tuple[str, ...]:
    """The ISAs this CPU runs less the portable build (the fallback of CPUs without them,
    timed by cpu_portable.py)."""
    return tuple(i for i in supported_isas() if i != "portable")


def part_isa(model, ids, new, repeats: int, nbp_per_round: int, isas: tuple[str, ...]) -> dict:
    fns, first = {}, {}
    calls = {}   # generations per timed call: NBP runs nbp_per_round times in a row
    for isa in isas:
        gen = FastGenerator(model)
        for mode in ("nbp", "ntp"):
            key = f"{mode}-{isa}"
            first[key], calls[key] = [], nbp_per_round if mode == "nbp" else 1
            fns[key] = repeated(with_isa(isa, generation(gen, ids, new, mode,
                                                         first_times=first[key])), calls[key])
    fns["baseline-nbp"] = lambda: baseline_generate(model, ids, new, mode="nbp", **SAMPLING)
    times, loads = timed_rounds(fns, repeats)
    # seconds per generation: an NBP round's mean over its back-to-back generations
    times = {k: [t / calls.get(k, 1) for t in v] for k, v in times.items()}
    first = {k: per_call(v, calls[k]) for k, v in first.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    def paired(a, b):   # per round: both timed within seconds of each other
        return statistics.median(x / y for x, y in zip(times[a], times[b]))
    # the decode steps alone: each call less its prefill (and first draw), the same work
    # for NBP and NTP (the warm-up call's is dropped)
    decode = {k: [t - f for t, f in zip(times[k], v[1:])] for k, v in first.items()}
    ratios = {isa: {"baseline_over_nbp": med["baseline-nbp"] / med[f"nbp-{isa}"],
                    "ntp_over_nbp": med[f"ntp-{isa}"] / med[f"nbp-{isa}"],
                    "paired_median_baseline_over_nbp": paired("baseline-nbp", f"nbp-{isa}"),
                    "paired_median_ntp_over_nbp": paired(f"ntp-{isa}", f"nbp-{isa}"),
                    "decode_steps_ntp_over_nbp": statistics.median(
                        a / b for a, b in zip(decode[f"ntp-{isa}"], decode[f"nbp-{isa}"])),
                    "targets_met": {"baseline_over_nbp>=5": med["baseline-nbp"] / med[f"nbp-{isa}"] >= 5,
                                    "ntp_over_nbp>=10": med[f"ntp-{isa}"] / med[f"nbp-{isa}"] >= 10}}
              for isa in isas}
    return {"isas": list(isas), "times_s": times, "median_s": med, "load_avg_1m_per_round": loads,
            "first_block_s": {k: v[1:] for k, v in first.items()},
            "median_first_block_s": {k: statistics.median(v[1:]) for k, v in first.items()},
            "median_decode_s": {k: statistics.median(v) for k, v in decode.items()},
            "ratios": ratios}


def timed_rounds(fns: dict, repeats: int) -> tuple[dict, list]:
    """Round-robin timing (one warm-up call each), the load average before each round."""
    times = {k: [] for k in fns}
    loads = []
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        loads.append(os.getloadavg()[0])
        for k, v in time_interleaved(fns, 1, warmup=0).items():
            times[k] += v
    return times, loads


def part_dtype(model, ids, new, repeats: int) -> dict:
    cfg, given = model.config, ids.shape[1]
    steps = {name: [] for name in DTYPES}
    fns = {}
    for name, (wd, ad) in DTYPES.items():
        gen = FastGenerator(model, weight_dtype=wd, act_dtype=ad)
        fns[f"nbp-{name}"] = generation(gen, ids, new, "nbp", steps[name])
    bandwidths = []
    fns["read-bandwidth"] = lambda: bandwidths.append(read_bandwidth())
    times, loads = timed_rounds(fns, repeats)
    for v in steps.values():
        del v[:len(v) // (repeats + 1)]   # the warm-up call's steps
    bw = statistics.median(bandwidths[1:])
    out = {"times_s": {k: v for k, v in times.items() if k != "read-bandwidth"},
           "median_s": {k: statistics.median(v) for k, v in times.items() if k != "read-bandwidth"},
           "read_bandwidth_GBps": {"median": bw / 1e9, "best": max(bandwidths[1:]) / 1e9,
                                   "all": [b / 1e9 for b in bandwidths[1:]]},
           "load_avg_1m_per_round": loads, "steps": {}}
    for name, (wd, _) in DTYPES.items():
        ratios, step_s, floor_s = [], [], []
        for s, sec in steps[name]:
            nbytes = weight_bytes(model, wd) + cache_bytes(cfg, given + s * cfg.block_size)
            ratios.append(sec / (nbytes / bw))
            step_s.append(sec)
            floor_s.append(nbytes / bw)
        out["steps"][name] = {"weight_bytes": weight_bytes(model, wd),
                              "median_step_ms": statistics.median(step_s) * 1e3,
                              "median_floor_ms": statistics.median(floor_s) * 1e3,
                              "median_step_over_floor": statistics.median(ratios),
                              "within_1.3x": statistics.median(ratios) <= 1.3}
    med, t = out["median_s"], out["times_s"]
    for name in DTYPES:
        if name != "float32":
            out[f"paired_median_{name}_speedup"] = statistics.median(
                a / b for a, b in zip(t["nbp-float32"], t[f"nbp-{name}"]))
            out[f"{name}_speedup_over_float32"] = med["nbp-float32"] / med[f"nbp-{name}"]
    out["targets_met"] = {f"{name}>=2x": out[f"{name}_speedup_over_float32"] >= 2
                          for name in DTYPES if name.startswith("int8")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["isa", "dtype"], required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the result file's name")
    p.add_argument("--nbp-per-round", type=int, default=10,
                   help="--part isa: NBP generations per round, back to back, their mean the "
                        "round's time (about as long as the round's one NTP generation, so "
                        "both average the machine's load over similar windows)")
    p.add_argument("--isas", default=None,
                   help="--part isa: comma-separated ISAs to time (default: every one this CPU "
                        "runs)")
    args = p.parse_args(argv)
    available = simd_isas()
    isas = available if args.isas is None else tuple(args.isas.split(","))
    if any(i not in available for i in isas):
        p.error(f"--isas: expected some of {', '.join(available) or 'none'} (this CPU), "
                f"got {args.isas!r}")
    configure_threads(args.threads)
    cfg, model, ids, new = k600_problem()
    given = ids.shape[1]
    isa, why = cpu_isa()
    info = dict(machine_info("cpu"), isa=isa, isa_reason=why, isas=list(available),
                prefill_gemm=prefill_gemm.route()[0],
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                gomp_spincount=os.environ.get("GOMP_SPINCOUNT"))
    body = part_isa(model, ids, new, args.repeats, args.nbp_per_round, isas) \
        if args.part == "isa" else \
        part_dtype(model, ids, new, args.repeats)
    info["load_avg_1m_after"] = os.getloadavg()[0]
    result = {"what": __doc__.split("\n\n")[0], "part": args.part, "config": cfg.to_dict(),
              "given": given, "new": new, "sampling": SAMPLING, "machine": info, **body}
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "times_s")}, indent=1))
    write_result(args.out / (f"cpu_k600_{args.part}_{info['torch_threads']}t_{machine_tag(info)}"
                             f"{args.tag}.json"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
