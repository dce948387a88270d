# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""Where the time of a K600 decode step on the CPU goes, against its memory and compute floors.

K600 frame-prediction shape (6 layers x 384, vocabulary 64000, 512 given + 768
new tokens, top-k 16000, top-p 0.9, random weights). One generation per
variant (NBP, 16 rows a step, at float32 / bfloat16 / int8 weights, bfloat16 weights
with bfloat16 activations, int8 weights with int16 or
int8 activations;
NTP, one row a step, float32), each with the step driven from C (one
``DecodeProgram.draw`` call: it times its own pieces, the embeddings, the layers'
linears, the attention, the head and the sampler's draw) and, for comparison, some
driven from Python (``-python``: the pieces timed by wrapping them, the packed
linears of the layers, the vocabulary head, the decode attention the generator
resolved with its fused cache append, LayerNorm, GELU, the sampler); "other" is
the rest (Python, embeddings, cache bookkeeping). ``--rounds`` (3)
generations per variant, round-robin: each variant reports its median round. Floors,
per step:

* memory: bytes the step must read (weights at their dtype + the KV cache at
  the step's median length) over the read bandwidth (``read_bandwidth``: the
  faster of a threaded sum and the packed linear's one-row stream; same run);
* compute: the linears' multiply-adds at the float32 matmul rate of an
  n x n ``torch.mm`` (same run); the integer-activation variants' dot products
  are not bound by it (VNNI does 4 int8 or 2 int16 multiply-adds per fp32 FMA);
* peak compute (``compute_floor_ms``): the linears' multiply-adds at this CPU's
  float32 FMA peak, or for int8 rows its int8 dot-product peak (cpu_peak.py's
  register-only loops at the ISA in force, same run), plus the attention's (QK^T
  and PV at the step's median length) at the FMA peak. No step can beat it; none
  for int16 or bfloat16 rows (their instructions' peaks are not measured) or int8
  rows without VNNI.

Writes benchmarks/results/cpu_step_breakdown_<threads>t_<machine><tag>.json.

    python benchmarks/ablations/cpu_step_breakdown.py --threads 2
    NBP_CPU_ISA=avx2 python benchmarks/ablations/cpu_step_breakdown.py --tag _avx2
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

import nbp.sampler as sampler_module
import nbp_kernels.packed_linear as packed_module
import cpu_peak
from ablation_args import write_result
from cpu_k600_isa_dtype import cache_bytes, k600_problem, read_bandwidth, weight_bytes
from nbp.commands.bench import machine_info, machine_tag
from nbp.generate import FastGenerator
from nbp.runner import Kernels
from nbp_kernels.cpu_build import configure_threads, cpu_isa
from nbp_kernels.decode_step_cpu import PIECES

RESULTS = Path(__file__).resolve().parents[1] / "results"
# name: (mode, weight dtype, activation dtype, C-driven step)
VARIANTS = {"nbp-float32": ("nbp", None, None, True), "nbp-int8": ("nbp", torch.int8, None, True),
            "nbp-int8_a16": ("nbp", torch.int8, torch.int16, True),
            "nbp-int8_a8": ("nbp", torch.int8, torch.int8, True),
            "nbp-bfloat16": ("nbp", torch.bfloat16, None, True),
            "nbp-bfloat16_abf16": ("nbp", torch.bfloat16, torch.bfloat16, True),
            "ntp-float32": ("ntp", None, None, True),
            "nbp-float32-python": ("nbp", None, None, False),
            "nbp-int8_a8-python": ("nbp", torch.int8, torch.int8, False),
            "ntp-float32-python": ("ntp", None, None, False)}


class Timers:
    """Seconds and calls per piece, collected by wrapping the pieces' entry points."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self._saved = []

    def timed(self, fn, piece):
        """fn, timed; piece: a name, or a function of the call's args giving one."""
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            key = piece(args) if callable(piece) else piece
            self.seconds[key] += time.perf_counter() - t0
            self.calls[key] += 1
            return out
        return timed

    def wrap(self, owner, name: str, piece):
        """Time ``owner.name`` (restored as it was: a classmethod stays one)."""
        self._saved.append((owner, name, vars(owner).get(name, getattr(owner, name))))
        setattr(owner, name, self.timed(getattr(owner, name), piece))

    def wrap_decode_attention(self):
        """Time the ``block_decode_attention`` of every ``Kernels`` resolved from now on
        (the function FastGenerator's decode steps call, whichever backend it is)."""
        resolve = Kernels.resolve

        def resolve_timed(*args, **kwargs):
            kernels = resolve(*args, **kwargs)
            return dataclasses.replace(kernels, decode={n: self.timed(fn, "attention")
                                                        for n, fn in kernels.decode.items()})
        self._saved.append((Kernels, "resolve", vars(Kernels)["resolve"]))
        Kernels.resolve = resolve_timed

    def restore(self):
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)


def instrument(vocab: int, attention: bool) -> Timers:
    """Timers around the Python-driven step's pieces (attention: the decode attention too,
    which keeps a generator on that path: a DecodeProgram runs only the cpu backend's own)."""
    t = Timers()
    t.wrap(packed_module.PackedLinear, "__call__",
           lambda a: "head" if a[0].out_features == vocab else "linears")
    t.wrap(sampler_module.BatchedSampler, "__call__", "sampler")
    if attention:
        t.wrap_decode_attention()
    t.wrap(F, "layer_norm", "layer_norm")
    t.wrap(F, "gelu", "gelu")
    return t


def matmul_gflops(n: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9


def compute_floor_ms(act_dtype, macs: int, attention_flops: float, peak: dict) -> float | None:
    """``macs`` linear multiply-adds and ``attention_flops`` at ``peak`` (cpu_peak.peaks):
    float32 FMAs (act_dtype None: float32 rows), or int8 dot products for int8 rows; None
    where the step's instructions have no measured peak (int16 or bfloat16 rows, int8 rows
    without VNNI)."""
    fp32 = peak["fp32_gflops"] * 1e9
    if act_dtype is None:
        linears = 2 * macs / fp32
    elif act_dtype == torch.int8 and peak["int8_gmacs"]:
        linears = macs / (peak["int8_gmacs"] * 1e9)
    else:
        return None
    return (linears + attention_flops / fp32) * 1e3


def programs(gen: FastGenerator) -> list:
    """The C-driven decode steps (``DecodeProgram``) the generator's cached steps run."""
    return [p for step in gen._steps.values() for p in step.runner._programs.values()
            if p is not None]


def breakdown(model, ids, new: int, mode: str, wd, ad, program: bool) -> dict:
    """Per-step milliseconds of each piece over the decode steps of one generation (after a
    warm-up one); the prefill and the first step are left out. Python-driven steps
    (``program`` False): the pieces are wrapped before the warm-up (the generator keeps
    the attention it resolved then: its cached decode steps hold it, so wrapping later
    would miss it). C-driven steps: the program times its own pieces."""
    gen = FastGenerator(model, weight_dtype=wd, act_dtype=ad)
    gen.decode_programs = program
    new = new if mode == "nbp" else 64        # NTP steps are all alike: 64 of them suffice
    timers, start = instrument(model.config.vocab_size, not program), []

    def first_step_done(step, _):   # the prefill and the first step are not decode steps
        if step == 0:
            timers.seconds.clear()
            timers.calls.clear()
            for p in programs(gen):
                p.timing = torch.zeros(len(PIECES), dtype=torch.float64)
            start.append(time.perf_counter())

    run = lambda: gen.generate_tokens(ids, new, mode=mode, generator=torch.Generator().manual_seed(0),
                                      top_k=16000, top_p=0.9, callback=first_step_done)
    try:
        run()
        run()
        total = time.perf_counter() - start[-1]
    finally:
        timers.restore()
    steps = new // (model.config.block_size if mode == "nbp" else 1) - 1
    for p in programs(gen):
        for piece, seconds in zip(PIECES, p.timing.tolist()):
            timers.seconds[piece] += seconds
    if program and not programs(gen):
        raise RuntimeError("decode_programs: no C-driven step ran (decode_step_cpu unusable?)")
    ms = {k: v / steps * 1e3 for k, v in timers.seconds.items()}
    ms["other"] = total / steps * 1e3 - sum(ms.values())
    return {"decode_steps": steps, "decode_s": total, "step_ms": total / steps * 1e3,
            "ms_per_step": ms, "calls_per_step": {k: v / steps for k, v in timers.calls.items()}}


def median_round(rounds: list[dict]) -> dict:
    """The round with the median step time (its pieces add up to it), with every round's
    step time (``step_ms_rounds``)."""
    row = dict(sorted(rounds, key=lambda r: r["step_ms"])[len(rounds) // 2])
    row["step_ms_rounds"] = [r["step_ms"] for r in rounds]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3,
                   help="generations per variant, round-robin; each variant reports its "
                        "median round (the machine's load moved single runs by 20%%)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the result file's name (e.g. _avx2 "
                                              "with NBP_CPU_ISA=avx2)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds: expected a positive int")
    configure_threads(args.threads)
    cfg, model, ids, new = k600_problem()
    given = ids.shape[1]
    bws, rates, runs = [], [], {name: [] for name in VARIANTS}
    peaks = [cpu_peak.peaks(args.threads, repeats=5)]
    for r in range(args.rounds):
        for name, (mode, wd, ad, program) in VARIANTS.items():
            bws.append(read_bandwidth())
            rates.append(matmul_gflops())
            runs[name].append(breakdown(model, ids, new, mode, wd, ad, program))
            print(f"{r + 1}/{args.rounds} {name:<12} {runs[name][-1]['step_ms']:7.2f} ms/step  "
                  + "  ".join(f"{k} {v:.2f}" for k, v in runs[name][-1]["ms_per_step"].items()),
                  flush=True)
    rows = {name: median_round(v) for name, v in runs.items()}
    peaks.append(cpu_peak.peaks(args.threads, repeats=5))
    bw, rate = statistics.median(bws[1:] or bws), statistics.median(rates)
    peak = {k: max(p[k] or 0 for p in peaks) or None for k in ("fp32_gflops", "int8_gmacs")}
    macs = sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear))
    for name, row in rows.items():
        mode, wd, ad, _ = VARIANTS[name]
        rows_per_step = cfg.block_size if mode == "nbp" else 1
        nbytes = weight_bytes(model, wd) + cache_bytes(cfg, given + new // 2)
        row["memory_floor_ms"] = nbytes / bw * 1e3
        row["fp32_compute_floor_ms"] = 2 * macs * rows_per_step / (rate * 1e9) * 1e3
        row["step_over_memory_floor"] = row["step_ms"] / row["memory_floor_ms"]
        # QK^T and PV: a multiply-add each per query row, cached position and channel
        attention = 4 * rows_per_step * (given + new // 2) * cfg.n_embd * cfg.n_layer
        row["compute_floor_ms"] = compute_floor_ms(ad, macs * rows_per_step, attention, peak)
    info = dict(machine_info("cpu"), isa=cpu_isa()[0],
                wait_policy={k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")})
    result = {"what": __doc__.split("\n\n")[0], "config": cfg.to_dict(), "given": given, "new": new,
              "read_bandwidth_GBps": bw / 1e9, "matmul_fp32_gflops": rate,
              "peak": {"isa": cpu_isa()[0], **peak},
              "linear_macs_per_row": macs, "machine": info, "variants": rows}
    print(json.dumps({k: (round(v["step_ms"], 2), round(v["memory_floor_ms"], 2),
                          round(v["fp32_compute_floor_ms"], 2),
                          v["compute_floor_ms"] and round(v["compute_floor_ms"], 2))
                      for k, v in rows.items()}))
    write_result(args.out / f"cpu_step_breakdown_{info['torch_threads']}t_{machine_tag(info)}"
                            f"{args.tag}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
