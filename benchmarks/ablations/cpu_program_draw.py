# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""The CPU decode step with its draw in the same C call, against the sampler called after it.

K600 frame-prediction shape (6 layers x 384, vocabulary 64000, 512 given + 768
new tokens, L = 16, top-k 16000, top-p 0.9, random weights), 2 threads. Each
round times, round-robin, NBP at float32 and int8 (int8 activations) weights
and NTP at float32, each with the draw inside the step's C call
(``DecodeProgram.draw``, what ``FastGenerator`` runs) and with the sampler
called from Python after the step (``separate``: ``draw_in_program = False``,
the path before the change). NBP generations run ``--nbp-per-round``
times back to back per round (their mean is the round's time), so NBP and NTP
average the machine's load over similar windows. Paired ratios within each
round: fused against separate per variant, and the issue's two ratios (NTP over
NBP at float32, int8 over float32 NBP) with the draw fused.

Writes benchmarks/results/cpu_program_draw_<threads>t_<machine><tag>.json.

    python benchmarks/ablations/cpu_program_draw.py --threads 2 --repeats 5
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from ablation_args import write_result
from cpu_k600_isa_dtype import SAMPLING, generation, k600_problem, repeated, timed_rounds
from nbp.commands.bench import machine_info, machine_tag
from nbp.generate import FastGenerator
from nbp_kernels.cpu_build import configure_threads, cpu_isa

RESULTS = Path(__file__).resolve().parents[1] / "results"
# name: (mode, weight_dtype, act_dtype)
VARIANTS = {"nbp-float32": ("nbp", None, None), "nbp-int8_a8": ("nbp", torch.int8, torch.int8),
            "ntp-float32": ("ntp", None, None)}


def ratios(times: dict) -> dict:
    """Paired (per round) medians: fused over separate, and the issue's ratios."""
    def paired(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))
    out = {f"paired_separate_over_fused_{v}": paired(f"{v}-separate", f"{v}-fused")
           for v in VARIANTS}
    for how in ("fused", "separate"):
        out[f"paired_ntp_over_nbp_{how}"] = paired(f"ntp-float32-{how}", f"nbp-float32-{how}")
        out[f"paired_int8_a8_speedup_{how}"] = paired(f"nbp-float32-{how}", f"nbp-int8_a8-{how}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nbp-per-round", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the result file's name")
    args = p.parse_args(argv)
    configure_threads(args.threads)
    cfg, model, ids, new = k600_problem()
    fns, calls = {}, {}
    for name, (mode, wd, ad) in VARIANTS.items():
        for how in ("fused", "separate"):
            gen = FastGenerator(model, weight_dtype=wd, act_dtype=ad)
            gen.draw_in_program = how == "fused"
            calls[f"{name}-{how}"] = n = args.nbp_per_round if mode == "nbp" else 1
            fns[f"{name}-{how}"] = repeated(generation(gen, ids, new, mode), n)
    times, loads = timed_rounds(fns, args.repeats)
    times = {k: [t / calls[k] for t in v] for k, v in times.items()}
    isa, why = cpu_isa()
    info = dict(machine_info("cpu"), isa=isa, isa_reason=why,
                load_avg_1m_after=os.getloadavg()[0])
    result = {"what": __doc__.split("\n\n")[0], "config": cfg.to_dict(), "given": ids.shape[1],
              "new": new, "sampling": SAMPLING, "machine": info, "times_s": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "load_avg_1m_per_round": loads, **ratios(times)}
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "times_s")},
                     indent=1))
    write_result(args.out / f"cpu_program_draw_{info['torch_threads']}t_{machine_tag(info)}"
                            f"{args.tag}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
