"""Decode-step linears per weight dtype against the memory floor (issue 15, item 2).

The K600 shape (6 layers x 384, vocabulary 64000): the 36 layer linears and
the vocabulary head of one decode step, at 1 row (an NTP step) and 16 (an NBP
step, L = 16), through ``PackedLinear`` with float32, bfloat16 and int8
weights, int8 weights with int16 or int8 activations (``act_dtype=torch.int16`` /
``torch.int8``, ``int8_linear``) and bfloat16 weights with bfloat16 activations
(``act_dtype=torch.bfloat16``, on the path ``packed_linear.bf16_path`` names), against torch's ``F.linear`` (MKL). For the head alone, the libraries
torch ships, side by side: oneDNN with a prepacked weight
(``torch.ops.mkldnn._linear_pointwise``; its bf16 kernel takes bf16
activations), ``torch._weight_int8pack_mm`` (int8 weights, fp32 activations)
and ``torch.ao`` dynamic int8 (fbgemm; int8 activations too).

The step group is all 37 linears of a step in order (141 MB of float32
weights): the weights stream through the caches as in generation. Memory
floor of a row: the time to read as many bytes as its weights hold at their
dtype (a threaded sum over a float32 buffer of that size, timed in the same
round-robin, so it sees the same caches and load); also reported, the read
bandwidth over a 1 GiB buffer, larger than any cache. Medians and bests. Writes
benchmarks/results/cpu_weight_dtype_<isa>_<threads>t_<machine>.json.

    python benchmarks/ablations/cpu_weight_dtype.py --threads 2 --repeats 15
    NBP_CPU_ISA=avx2 python benchmarks/ablations/cpu_weight_dtype.py ...   # the AVX2 path
    NBP_CPU_BF16=off python benchmarks/ablations/cpu_weight_dtype.py --tag _nobf16 ...
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch

from nbp.commands.bench import machine_info, machine_tag, median, time_interleaved
from nbp_kernels import reference
from nbp_kernels.cpu_build import configure_threads, cpu_isa
from nbp_kernels.packed_linear import PackedLinear, bf16_path, is_available
from ablation_args import write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"
WIDTH, VOCAB, LAYERS = 384, 64000, 6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


def linears() -> dict[str, list[torch.nn.Linear]]:
    torch.manual_seed(0)
    layer = [(WIDTH, WIDTH)] * 4 + [(WIDTH, 4 * WIDTH), (4 * WIDTH, WIDTH)]
    head = torch.nn.Linear(WIDTH, VOCAB, bias=False)
    return {"head": [head],
            "step": [torch.nn.Linear(i, o) for _ in range(LAYERS) for i, o in layer] + [head]}


def read_bandwidth(repeats: int) -> float:
    """Bytes per second that a threaded sum reads from a 1 GiB buffer (best of repeats)."""
    buf = torch.ones(256 << 20)
    times = time_interleaved({"sum": lambda: buf.sum()}, repeats)["sum"]
    return buf.numel() * 4 / min(times)


def head_libraries(head: torch.nn.Linear, rows: int) -> dict[str, tuple[callable, int]]:
    """Library implementations of the head at ``rows`` rows: name -> (fn, weight bytes)."""
    w, n = head.weight.detach(), head.weight.numel()
    x = torch.randn(rows, WIDTH)
    fns = {"torch F.linear float32": (lambda: torch.nn.functional.linear(x, w), 4 * n)}
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    fns["onednn prepacked float32"] = (
        lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 4 * n)
    xb, packed_b = x.bfloat16(), torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), rows)
    fns["onednn prepacked bfloat16 (bf16 activations)"] = (
        lambda: torch.ops.mkldnn._linear_pointwise(xb, packed_b, None, "none", [], ""), 2 * n)
    q, scale = reference.quantize_weight(w, torch.int8)
    fns["torch._weight_int8pack_mm int8"] = (lambda: torch._weight_int8pack_mm(x, q, scale), n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(head), {torch.nn.Linear},
                                                     dtype=torch.qint8)
    fns["torch.ao dynamic int8 (int8 activations)"] = (lambda: dyn(x), n)
    return fns


def methods(mods: dict, rows: int, libraries: bool) -> dict[str, tuple[callable, int]]:
    """name -> (one call of every linear in the group, bytes of their weights); plus
    "<group> read <bytes>": a sum over that many bytes, the floor."""
    out = {}
    for group, ms in mods.items():
        xs = [torch.randn(1, rows, m.in_features) for m in ms]
        n = sum(m.weight.numel() for m in ms)
        out[f"{group} torch F.linear float32"] = (
            lambda ms=ms, xs=xs: [m(x) for m, x in zip(ms, xs)], 4 * n)
        for name, dtype in DTYPES.items():
            packed = [PackedLinear(m, weight_dtype=dtype) for m in ms]
            size = torch.tensor([], dtype=dtype).element_size()
            scale_bytes = 4 * sum(m.out_features for m in ms) if dtype == torch.int8 else 0
            out[f"{group} packed_linear {name}"] = (
                lambda ps=packed, xs=xs: [p(x) for p, x in zip(ps, xs)], size * n + scale_bytes)
        for act in ("int16", "int8"):
            ps = [PackedLinear(m, weight_dtype=torch.int8, act_dtype=getattr(torch, act))
                  for m in ms]
            out[f"{group} int8_linear int8 ({act} activations)"] = (
                lambda ps=ps, xs=xs: [p(x) for p, x in zip(ps, xs)],
                n + 4 * sum(m.out_features for m in ms))
        ps = [PackedLinear(m, weight_dtype=torch.bfloat16, act_dtype=torch.bfloat16) for m in ms]
        out[f"{group} packed_linear bfloat16 (bfloat16 activations, {bf16_path()[0]})"] = (
            lambda ps=ps, xs=xs: [p(x) for p, x in zip(ps, xs)], 2 * n)
        if group == "head" and libraries:
            out.update({f"head {k}": v for k, v in head_libraries(ms[0], rows).items()})
    return out


def floors(mods: dict) -> dict[str, tuple[callable, int]]:
    """"<group> read <dtype>": a threaded sum over the bytes of the group's weights at dtype."""
    out = {}
    for group, ms in mods.items():
        n = sum(m.weight.numel() for m in ms)
        for name, dtype in DTYPES.items():
            buf = torch.ones(n * torch.tensor([], dtype=dtype).element_size() // 4)
            out[f"{group} read {name}"] = (lambda buf=buf: buf.sum(), 4 * buf.numel())
    return out


def run(args) -> dict:
    mods = linears()
    bandwidth = read_bandwidth(args.repeats)
    rows_out = []
    with torch.no_grad():
        for rows in (1, 16):
            fns = methods(mods, rows, not args.no_libraries)
            reads = floors(mods)
            times = time_interleaved({k: f for k, (f, _) in {**fns, **reads}.items()}, args.repeats)
            for name, (_, nbytes) in fns.items():
                group, dtype = name.split()[0], next(d for d in DTYPES if d in name)
                med, best = median(times[name]), min(times[name])
                floor = median(times[f"{group} read {dtype}"])
                rows_out.append({"rows": rows, "method": name, "weight_bytes": nbytes,
                                 "median_ms": med * 1e3, "best_ms": best * 1e3,
                                 "floor_ms": floor * 1e3, "median_over_floor": med / floor,
                                 "floor_at_1GiB_bandwidth_ms": nbytes / bandwidth * 1e3})
    return {"read_bandwidth_1GiB_GBps": bandwidth / 1e9, "rows": rows_out}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: up to 2)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-libraries", action="store_true", help="skip oneDNN / int8pack / torch.ao")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the result file's name")
    args = p.parse_args(argv)
    configure_threads(args.threads)
    ok, why = is_available()
    if not ok:
        raise SystemExit(f"packed_linear unusable here: {why}")
    isa, isa_why = cpu_isa()
    info = dict(machine_info("cpu"), isa=isa, isa_reason=isa_why, bf16_path=bf16_path(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                gomp_spincount=os.environ.get("GOMP_SPINCOUNT"))
    result = {"what": __doc__.split("\n\n")[0], "shape": {"width": WIDTH, "vocab": VOCAB,
                                                         "layers": LAYERS},
              "machine": info, **run(args)}
    result["machine"]["load_avg_1m_after"] = machine_info("cpu")["load_avg_1m"]
    print(f"{info['cpu']} ({info['cpu_cores']} cores), ISA {isa}, {info['torch_threads']} threads, "
          f"load {info['load_avg_1m']}; read bandwidth (1 GiB) {result['read_bandwidth_1GiB_GBps']:.1f} GB/s")
    for r in result["rows"]:
        print(f"rows={r['rows']:>2} {r['method']:<52} {r['median_ms']:8.2f} ms (best "
              f"{r['best_ms']:7.2f})  floor {r['floor_ms']:6.2f} ms  x{r['median_over_floor']:.2f}")
    write_result(args.out / f"cpu_weight_dtype_{isa}_{info['torch_threads']}t_{machine_tag(info)}"
                 f"{args.tag}.json",
                 result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
