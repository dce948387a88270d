# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""The float32 CPU prefill through oneDNN against BLAS, side by side (``nbp_kernels.prefill_gemm``).

K600 frame-prediction shape (6 layers x 384, vocabulary 64000, 512 given tokens,
L = 16, random weights), one FastGenerator, float32 weights. Each round times,
round-robin, the first block of an NBP generation (the 512-token prefill and
the draw of its 16 tokens) with ``NBP_PREFILL_GEMM=onednn`` and ``=blas``, and
with oneDNN given each weight reordered once into its blocked layout
(``onednn_prepacked``, the variant not taken: a second copy of every weight);
paired ratios within each round. Also each layer shape's product alone (512
rows, ``F.linear`` against ``prefill_gemm.linear``, GFLOP/s).

Writes benchmarks/results/cpu_prefill_gemm_<threads>t_<machine><tag>.json.

    python benchmarks/ablations/cpu_prefill_gemm.py --threads 2 --repeats 21

The same with torch's libraries held to AVX2, standing for a CPU without AVX-512
(the default route is then BLAS; both routes are still timed, the caps recorded in
``machine.isa_caps``):

    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        python benchmarks/ablations/cpu_prefill_gemm.py --tag _avx2libs
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ablation_args import add_cpu_run_args, write_result
from cpu_k600_isa_dtype import generation, k600_problem
from nbp.commands.bench import machine_info, machine_tag, time_interleaved
from nbp.generate import FastGenerator
from nbp_kernels import prefill_gemm
from nbp_kernels.cpu_build import configure_threads

RESULTS = Path(__file__).resolve().parents[1] / "results"
ROUTES = ("onednn", "blas", "onednn_prepacked")


def prepacked(linear):
    """``linear`` (prefill_gemm's) given each weight reordered once into oneDNN's blocked
    layout (``_reorder_linear_weight``, for 512 rows): the variant not taken, which keeps
    a second float32 copy of every weight."""
    copies = {}

    def run(x, weight, bias, act, residual):
        if weight not in copies:
            copies[weight] = torch.ops.mkldnn._reorder_linear_weight(
                weight.detach().contiguous(), 512)
        return linear(x, copies[weight], bias, act, residual)
    return run


def with_route(route: str, fn):
    """fn run with NBP_PREFILL_GEMM set to the route ("onednn_prepacked": onednn, with
    ``prepacked`` weights)."""
    base = prefill_gemm.linear
    linear = prepacked(base) if route == "onednn_prepacked" else base

    def run():
        os.environ[prefill_gemm.ENV] = route.split("_")[0]
        prefill_gemm.linear = linear
        try:
            return fn()
        finally:
            prefill_gemm.linear = base
    return run


def layer_rates(width: int, rows: int, repeats: int) -> dict:
    """GFLOP/s of each layer shape's product (rows x width), BLAS and oneDNN, round-robin."""
    torch.manual_seed(0)
    out = {}
    for n_out, n_in in ((3 * width, width), (width, width), (4 * width, width),
                        (width, 4 * width)):
        x, w, b = torch.randn(rows, n_in), torch.randn(n_out, n_in), torch.randn(n_out)
        times = time_interleaved({"blas": lambda: F.linear(x, w, b),
                                  "onednn": lambda: prefill_gemm.linear(x, w, b, None, None)},
                                 repeats, warmup=2)
        flops = 2 * rows * n_in * n_out
        out[f"{n_in}->{n_out}"] = {k: flops / statistics.median(v) / 1e9
                                   for k, v in times.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_cpu_run_args(p, RESULTS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats: expected a positive int")
    if not prefill_gemm.is_available()[0]:
        p.error(f"oneDNN unusable here: {prefill_gemm.is_available()[1]}")
    configure_threads(args.threads)
    cfg, model, ids, _ = k600_problem()
    gen = FastGenerator(model)
    first = {r: [] for r in ROUTES}
    fns = {r: with_route(r, generation(gen, ids, cfg.block_size, "nbp", first_times=first[r]))
           for r in ROUTES}
    saved = os.environ.get(prefill_gemm.ENV)
    default = prefill_gemm.route()   # before the variants set the variable
    try:
        time_interleaved(fns, args.repeats)
    finally:
        if saved is None:
            os.environ.pop(prefill_gemm.ENV, None)
        else:
            os.environ[prefill_gemm.ENV] = saved
    first = {r: v[1:] for r, v in first.items()}   # less the warm-up call
    info = machine_info()
    paired = {f"{a}_over_{b}": statistics.median([x / y for x, y in zip(first[a], first[b])])
              for a, b in (("blas", "onednn"), ("onednn", "onednn_prepacked"))}
    result = {
        "what": "K600 first block (512-token prefill + its 16-token draw), float32 weights: "
                "NBP_PREFILL_GEMM=onednn vs blas, round-robin",
        "config": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "vocab": cfg.vocab_size,
                   "given": ids.shape[1], "block": cfg.block_size},
        "threads": args.threads, "machine": info,
        "default_route": {"route": default[0], "why": default[1]},
        "load_avg_1m": os.getloadavg()[0],
        "first_block_s": first,
        "median_first_block_s": {r: statistics.median(v) for r, v in first.items()},
        "paired_median": paired,
        "layer_gflops_512_rows": layer_rates(cfg.n_embd, 512, args.repeats),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_result(args.out / f"cpu_prefill_gemm_{args.threads}t_{machine_tag(info)}{args.tag}.json",
                 result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
