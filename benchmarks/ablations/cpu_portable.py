# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""The portable build against torch on a CPU without AVX2: K600 generation on the CPU.

``NBP_CPU_ISA=portable`` (the kernels' NEON code compiled for x86-64's baseline, SSE2)
against ``NBP_CPU_ISA=off`` (torch alone), both on a CPU stood in for by this one with
torch held to SSE as well: the script runs itself again with
``MKL_ENABLE_INSTRUCTIONS=SSE4_2``, ``ONEDNN_MAX_CPU_ISA=SSE41`` and
``ATEN_CPU_CAPABILITY=default`` set before torch loads. The K600 frame-prediction shape
of cpu_k600_isa_dtype.py (float32, top-k 16000, top-p 0.9), nbp NBP and nbp NTP on each
side, round-robin (``time_interleaved``; medians). A stand-in, not a real pre-AVX2 CPU:
its caches, clocks and memory stay this machine's. Writes
benchmarks/results/cpu_portable_<threads>t_<machine>.json.

    python benchmarks/ablations/cpu_portable.py --threads 2 --repeats 3
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import os
import subprocess
import sys
from pathlib import Path

# torch's own vector code held to SSE, as on a CPU without AVX2 (read when torch loads)
SSE_ONLY = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41",
            "ATEN_CPU_CAPABILITY": "default"}
RESULTS = Path(__file__).resolve().parents[1] / "results"


def measure(repeats: int, threads: int) -> dict:
    import torch
    from ablation_args import write_result
    from cpu_k600_isa_dtype import SAMPLING, k600_problem, with_isa
    from nbp.commands.bench import machine_info, machine_tag, median, time_interleaved
    from nbp.generate import FastGenerator
    from nbp_kernels.cpu_build import configure_threads

    configure_threads(threads)
    cfg, model, ids, new = k600_problem()
    fns = {}
    for isa in ("portable", "off"):
        gen = with_isa(isa, lambda: FastGenerator(model))()   # built for the ISA it runs
        for mode in ("nbp", "ntp"):
            fns[f"{mode}-{isa}"] = with_isa(isa, lambda g=gen, m=mode: g.generate_tokens(
                ids, new, mode=m, **SAMPLING))
    times = time_interleaved(fns, repeats)
    med = {k: median(v) for k, v in times.items()}
    info = dict(machine_info("cpu"), torch_env=SSE_ONLY,
                aten_cpu_capability=torch.backends.cpu.get_cpu_capability())
    result = {"what": __doc__.split("\n\n")[0], "given": ids.shape[1], "new": new,
              "sampling": SAMPLING, "machine": info, "times_s": times, "median_s": med,
              "portable_speedup": {m: med[f"{m}-off"] / med[f"{m}-portable"]
                                   for m in ("nbp", "ntp")}}
    write_result(RESULTS / f"cpu_portable_{threads}t_{machine_tag(info)}.json", result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in SSE_ONLY.items()):   # torch already loaded
        return subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:])],
                              env={**os.environ, **SSE_ONLY}).returncode
    r = measure(args.repeats, args.threads)
    print({k: round(v, 3) for k, v in r["median_s"].items()}, r["portable_speedup"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
