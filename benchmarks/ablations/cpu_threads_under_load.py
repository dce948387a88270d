"""Decode steps on a busy CPU: threads x OpenMP wait policy, with and without a busy loop.

OpenMP worker threads that spin-wait after a parallel region take a shared
core from the thread that still has work: under background load, 2 threads
were measured 10-50x slower than 1 (issue 15, item 3). Each configuration runs
in a fresh process (libgomp reads its wait policy once, when torch loads it)
and times decode-step-like work: the linears of a step through
``PackedLinear`` plus the sampler's ``keep_threshold`` and ``draw_kept``,
16 rows, for a K600-sized step (6 x 384, vocabulary 64000) and a small one
(2 x 128, vocabulary 1024, like the demo model). The background load is one
busy-looping process per ``--busy`` (started and stopped here).
Writes benchmarks/results/cpu_threads_under_load_<machine>.json.

    python benchmarks/ablations/cpu_threads_under_load.py --repeats 30
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROOT = Path(__file__).resolve().parents[2]
POLICIES = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            **{f"spincount-{n}": {"GOMP_SPINCOUNT": str(n)} for n in (300, 1000, 3000, 10000, 30000)}}
SHAPES = {"k600": (6, 384, 64000), "small": (2, 128, 1024)}

CHILD = r"""
import json, statistics, sys, time
import torch
from nbp_kernels import sample_cpu
from nbp_kernels.packed_linear import PackedLinear
threads, layers, width, vocab, repeats = map(int, sys.argv[1:6])
torch.set_num_threads(threads)
torch.manual_seed(0)
shapes = [(width, width)] * 4 + [(width, 4 * width), (4 * width, width)]
mods = [torch.nn.Linear(i, o) for _ in range(layers) for i, o in shapes]
mods.append(torch.nn.Linear(width, vocab, bias=False))
packed = [PackedLinear(m) for m in mods]
xs = [torch.randn(16, m.in_features) for m in mods]
logits = torch.randn(16, vocab)
work = torch.empty(sample_cpu.work_shape(16, vocab))
u = torch.rand(16, dtype=torch.float64)
def step():
    for p, x in zip(packed, xs):
        p(x)
    tau, m = sample_cpu.keep_threshold(logits, max(1, vocab // 4), 0.9, work=work)
    sample_cpu.draw_kept(logits, tau, m, u)
with torch.no_grad():
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps({"median_ms": statistics.median(times) * 1e3, "best_ms": min(times) * 1e3,
                  "p90_ms": sorted(times)[int(0.9 * len(times))] * 1e3}))
"""


def measure(policy: str, threads: int, shape: str, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(POLICIES[policy])
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    args = [str(threads), *map(str, SHAPES[shape]), str(repeats)]
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, check=True,
                         capture_output=True, text=True, timeout=900)
    return json.loads(out.stdout.strip().splitlines()[-1])


def with_busy_loops(n: int, fn):
    """fn() while n processes spin on the CPU; they are stopped afterwards, whatever happens."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        return fn()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    from ablation_args import write_result
    from nbp.commands.bench import machine_info, machine_tag
    from nbp_kernels.cpu_build import cpu_isa

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--busy", type=int, nargs="+", default=[0, 1], help="busy loops to run (each)")
    p.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the result file's name")
    args = p.parse_args(argv)
    info = dict(machine_info("cpu"), isa=cpu_isa()[0])
    rows = []
    for busy, shape, policy, threads in itertools.product(args.busy, SHAPES, args.policies,
                                                       (1, 2)):
        load = os.getloadavg()[0]
        r = with_busy_loops(busy, lambda: measure(policy, threads, shape, args.repeats))
        rows.append({"busy_loops": busy, "shape": shape, "policy": policy, "threads": threads,
                     "load_avg_1m_before": load, **r})
        print(f"busy={busy} {shape:<6} {policy:<14} threads={threads}  median {r['median_ms']:9.2f} ms"
              f"  best {r['best_ms']:8.2f}  p90 {r['p90_ms']:9.2f}  (load {load:.1f})", flush=True)
    result = {"what": __doc__.split("\n\n")[0], "machine": info,
              "policies": {k: POLICIES[k] for k in args.policies},
              "shapes": SHAPES, "rows": rows}
    write_result(args.out / f"cpu_threads_under_load_{machine_tag(info)}{args.tag}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
