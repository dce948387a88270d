# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""The multiply-add peak of this CPU at the kernels' vector width: float32 FMAs, int8 dot products.

``cpu_peak.c``'s register-only loops (no memory traffic), compiled with cpu_build's flags
for each ISA this CPU runs, timed at 1 thread and at ``--threads``; the best of
``--repeats`` calls of ~0.2 s each. No kernel can beat these rates: a step's
multiply-adds over them are a floor its time cannot go below (cpu_step_breakdown.py's
``compute_floor_ms``). int8: AVX512-VNNI's vpdpbusd on zmm, where the CPU has it.

Writes benchmarks/results/cpu_peak_<threads>t_<machine>.json.

    python benchmarks/ablations/cpu_peak.py --threads 2
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import ctypes
import functools
import tempfile
import time
from pathlib import Path

import torch

from ablation_args import write_result
from nbp.commands.bench import machine_info, machine_tag
from nbp_kernels import cpu_build
from nbp_kernels.cpu_build import configure_threads, supported_isas

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
SECONDS = 0.2   # per timed call


@functools.cache
def build(isa: str) -> ctypes.CDLL:
    """cpu_peak.c compiled with cpu_build's flags for ``isa`` (its isa.h from nbp_kernels/cpu),
    once per process and ISA."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"cpu_peak_{isa}.so"
        cpu_build.compile_c(HERE / "cpu_peak.c", "cpu_peak", isa, out)
        lib = ctypes.CDLL(str(out))   # mapped: the file may go
    for name in ("nbp_fma_peak", "nbp_int8_dot_peak"):
        getattr(lib, name).restype = ctypes.c_double
        getattr(lib, name).argtypes = [ctypes.c_int64, ctypes.c_int]
    return lib


def rate(fn, threads: int, repeats: int) -> float:
    """The best of ``repeats`` calls of fn (multiply-adds per second), each ~SECONDS long;
    0 where fn returns 0 (not available)."""
    t0 = time.perf_counter()
    if fn(1 << 16, threads) == 0:
        return 0.0
    iters = max(1 << 16, int((1 << 16) * SECONDS / max(time.perf_counter() - t0, 1e-6)))
    return max(fn(iters, threads) for _ in range(repeats))


def peaks(threads: int, isa: str | None = None, repeats: int = 3) -> dict:
    """{"isa", "fp32_gflops", "int8_gmacs" (None without VNNI)} at ``threads`` threads for
    ``isa`` (default: the one in force); FLOPs count a multiply-add as 2, int8 MACs as 1."""
    isa = isa or cpu_build.cpu_isa()[0]
    lib = build(isa)
    int8 = rate(lib.nbp_int8_dot_peak, threads, repeats)
    return {"isa": isa, "fp32_gflops": 2 * rate(lib.nbp_fma_peak, threads, repeats) / 1e9,
            "int8_gmacs": int8 / 1e9 if int8 else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats: expected positive ints")
    configure_threads(args.threads)
    isas = [i for i in supported_isas() if i != "portable"]
    rows = {f"{isa}-{t}t": peaks(t, isa, args.repeats) for isa in isas
            for t in sorted({1, args.threads})}
    for name, row in rows.items():
        print(f"{name:<12} fp32 {row['fp32_gflops']:7.1f} GFLOP/s   int8 "
              + (f"{row['int8_gmacs']:7.1f} GMAC/s" if row["int8_gmacs"] else "-"))
    info = machine_info("cpu")
    result = {"what": __doc__.split("\n\n")[0], "machine": info,
              "torch_threads": torch.get_num_threads(), "peaks": rows}
    write_result(args.out / f"cpu_peak_{info['torch_threads']}t_{machine_tag(info)}.json",
                 result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
