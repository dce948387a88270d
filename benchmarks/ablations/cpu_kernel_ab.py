# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""A/B of a CPU kernel (``nbp_kernels/cpu/<kernel>.c``): a git revision against the working tree.

Both sources are compiled with ``cpu_build``'s flags for the ISA in force
(``NBP_CPU_ISA``) into a temporary directory and called side by side, round-robin
(medians and bests), after checking that they agree:

* ``packed_linear``: the K600 vocabulary head (64000 x 384) and one decode step's
  linears (6 layers x 384 + head) at 1 and 16 rows, per weight dtype; writes
  benchmarks/results/cpu_kernel_ab_<isa>_<machine>.json.
* ``int8_linear``: the same head and step with int8 weights and int8 or int16
  activations (``act_dtype``), and a prefill's layer products (512 rows), on the path in force (``nbp info``'s int8_linear line);
  writes benchmarks/results/cpu_kernel_ab_int8_linear_<path>_<machine>.json.
* ``decode_attention``: one K600 decode step's attention (6 layers of 6 heads x 64,
  a cache of 900 positions, 16 and 1 queries), hot (each side reads its caches just before:
  in L3 where it holds their 24 MB, not in L2) and cold
  (a 256 MB read between calls, as a step's weight stream evicts them); writes
  benchmarks/results/cpu_kernel_ab_decode_attention_<isa>_<machine>.json.

    python benchmarks/ablations/cpu_kernel_ab.py --rev HEAD~1 --repeats 15
    python benchmarks/ablations/cpu_kernel_ab.py --kernel decode_attention --repeats 40
    NBP_CPU_ISA=avx2 python benchmarks/ablations/cpu_kernel_ab.py --a-isa avx512   # ISA vs ISA
    NBP_CPU_ISA=avx2 python benchmarks/ablations/cpu_kernel_ab.py --kernel int8_linear \
        --a-path avx2                                        # AVX2 vs AVX-VNNI tiles
"""
from __future__ import annotations

import nbp  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch loads libgomp)

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from nbp.commands.bench import machine_info, machine_tag, time_interleaved
from nbp.io import atomic_write_text
from nbp_kernels import cpu_build, decode_attention_cpu, int8_linear, packed_linear, reference
from nbp_kernels._cpu_launch import norm_args
from nbp_kernels.packed_linear import WEIGHT_DTYPES, pack_weight

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
KERNELS = ("packed_linear", "int8_linear", "decode_attention")
BINDS = {"packed_linear": packed_linear._bind, "int8_linear": int8_linear._bind,
         "decode_attention": decode_attention_cpu._bind}


def git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def revision_source(rev: str, kernel: str, dest: Path) -> str:
    """The kernel's source as of ``rev``, with that revision's headers (cpu/*.h) written into
    ``dest``, so each side compiles against the headers it was written for."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev,
                            "nbp_kernels/cpu/"], check=True, capture_output=True,
                           text=True).stdout.split()
    for name in names:
        if name.endswith(".h"):
            (dest / Path(name).name).write_text(git_show(rev, name))
    return git_show(rev, f"nbp_kernels/cpu/{kernel}.c")


def build(source: str, kernel: str, isa: str, out: Path, include: Path) -> ctypes.CDLL:
    """``source`` compiled as cpu_build does for ``isa``, its headers from ``include``."""
    src = out.with_suffix(".c")
    src.write_text(source)
    cpu_build.compile_c(src, kernel, isa, out, include)
    return BINDS[kernel](ctypes.CDLL(str(out)))


def layers(width=384, vocab=64000, n_layer=6):
    torch.manual_seed(0)
    shapes = [(width, width)] * 4 + [(width, 4 * width), (4 * width, width)]
    head = torch.nn.Linear(width, vocab, bias=False)
    return {"head": [head], "step": [torch.nn.Linear(i, o) for _ in range(n_layer)
                                     for i, o in shapes] + [head]}


def call(lib, mods, dtype, rows):
    """A closure running every module of ``mods`` on ``rows`` rows through ``lib``."""
    args = []
    for m in mods:
        stored, scale = reference.quantize_weight(m.weight.detach(), dtype)
        packed = pack_weight(stored)
        bias = None if m.bias is None else m.bias.detach().contiguous()
        x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(rows))
        y = torch.empty(rows, m.out_features)
        args.append((x, packed, scale, bias, y, m.out_features))

    def run():
        for x, packed, scale, bias, y, n in args:
            lib.nbp_packed_linear(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(),
                                  WEIGHT_DTYPES[packed.dtype],
                                  None if scale is None else scale.data_ptr(),
                                  None if bias is None else bias.data_ptr(), y.data_ptr(), n,
                                  0,   # act: none (revisions before it ignore the argument)
                                  0, None, None, 0.0, None)   # no norm, no residual (ditto)
        return args[-1][4]
    return run


def timed_row(fns: dict, repeats: int, row: dict, exact: bool = False) -> dict:
    """``row`` with the A/B timings of ``fns`` ({"a": run, "b": run}), after checking that
    they agree (exact: equal; else to float32 rounding)."""
    a, b = fns["a"]().clone(), fns["b"]()
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    load = os.getloadavg()[0]
    return summary({**row, "load_avg_1m": load}, time_interleaved(fns, repeats))


def linear_rows(libs: dict, repeats: int) -> list[dict]:
    """packed_linear's rows: head and step, 1 and 16 rows, per weight dtype."""
    return [timed_row({k: call(lib, mods, dtype, rows) for k, lib in libs.items()}, repeats,
                      {"what": what, "rows": rows, "dtype": name})
            for what, mods in layers().items() for rows in (1, 16)
            for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                ("int8", torch.int8))]


def int8_call(lib, mods, act_dtype, rows, path: str):
    """A closure running every module of ``mods`` with int8 weights and act_dtype
    activations on ``rows`` rows through ``lib`` (the kernel's ``path``)."""
    args = []
    for m in mods:
        stored, scale = reference.quantize_weight(m.weight.detach(), torch.int8)
        packed, corr = int8_linear.pack_weight(stored)
        bias = None if m.bias is None else m.bias.detach().contiguous()
        x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(rows))
        args.append((x, packed, corr, scale, bias, torch.empty(rows, m.out_features)))
    mode = int8_linear.mode(path, act_dtype)

    def run():
        for x, packed, corr, scale, bias, y in args:
            rc = lib.nbp_int8_linear(x.data_ptr(), x.shape[0], x.shape[1], packed.data_ptr(),
                                     corr.data_ptr(), scale.data_ptr(),
                                     None if bias is None else bias.data_ptr(), y.data_ptr(),
                                     y.shape[1], mode, 0, *norm_args(None), None)
            assert rc == 0, rc
        return args[-1][5]
    return run


def int8_rows(libs: dict, repeats: int, a_path: str | None = None) -> list[dict]:
    """int8_linear's rows (``int8_cases``), int8 and int16 activations (exact
    int32 sums: A and B agree bit for bit). B runs the path in force, A ``a_path`` (default
    the same)."""
    path = int8_linear.kernel_path()[0]
    paths = {"a": a_path or path, "b": path}
    return [timed_row({k: int8_call(lib, mods, act, rows, paths[k]) for k, lib in libs.items()},
                      repeats, {"what": what, "rows": rows, "dtype": f"int8_a{name[3:]}",
                                "path": path, "a_path": paths["a"]}, exact=True)
            for what, mods, rows in int8_cases()
            for name, act in (("int8", torch.int8), ("int16", torch.int16))]


def int8_cases() -> list[tuple]:
    """(what, modules, rows): head and step at 1 and 16 rows, a step's layer products (the
    step's linears less the head, whose time hides theirs in the step row) at 16 rows, and a
    prefill's at 512 rows."""
    mods = layers()
    return [(what, m, rows) for what, m in mods.items() for rows in (1, 16)] + [
        ("step layers", mods["step"][:-1], 16), ("prefill layers", mods["step"][:-1], 512)]


def summary(row: dict, t: dict) -> dict:
    """``row`` with the medians, bests and A/B of timings ``t`` ({"a": [...], "b": [...]})."""
    row.update({f"{k}_median_ms": statistics.median(v) * 1e3 for k, v in t.items()})
    row.update({f"{k}_best_ms": min(v) * 1e3 for k, v in t.items()})
    row["a_over_b_median"] = row["a_median_ms"] / row["b_median_ms"]
    print("  ".join(f"{k}={v}" for k, v in row.items() if k in ("what", "rows", "dtype", "queries",
                                                                  "cache")) +
          f": A {row['a_median_ms']:7.3f} ms  B {row['b_median_ms']:7.3f} ms  "
          f"A/B {row['a_over_b_median']:.3f}  (load {row['load_avg_1m']:.1f})")
    return row


def attention_step(lib, queries: int, cached: int = 900, n_layer: int = 6, heads: int = 6,
                   head_dim: int = 64, capacity: int = 1280):
    """A closure running one decode step's attention (every layer, no append) through ``lib``."""
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(1, heads, capacity, head_dim, generator=g),
               torch.randn(1, heads, capacity, head_dim, generator=g)) for _ in range(n_layer)]
    q = [torch.randn(1, heads, queries, head_dim, generator=g) for _ in range(n_layer)]
    seq = torch.tensor([cached], dtype=torch.int32)
    c_st = [heads * capacity * head_dim, capacity * head_dim, head_dim]
    strides = torch.tensor([heads * queries * head_dim, queries * head_dim, head_dim] + [0] * 6
                           + c_st + c_st, dtype=torch.int64)
    n = cached + queries
    splits = decode_attention_cpu.splits_for(heads, threads, -(-n // decode_attention_cpu.CHUNK))
    work = torch.empty(threads, lib.nbp_decode_attention_work(queries, head_dim))
    parts = torch.empty(heads * splits * queries * (head_dim + 2))
    outs = [torch.empty(1, queries, heads, head_dim) for _ in range(n_layer)]

    def run():
        for (kc, vc), qi, out in zip(caches, q, outs):
            lib.nbp_decode_attention(qi.data_ptr(), None, None, kc.data_ptr(), vc.data_ptr(),
                                     strides.data_ptr(), seq.data_ptr(), 1, heads, queries,
                                     head_dim, capacity, head_dim ** -0.5, splits, threads,
                                     work.data_ptr(), parts.data_ptr(), out.data_ptr())
        return torch.stack(outs)
    return run


def attention_rows(libs: dict, repeats: int) -> list[dict]:
    """decode_attention's rows: 16 and 1 queries, the caches hot and cold; A and B in
    alternating order, a 256 MB read before each cold call (not timed)."""
    flush = torch.ones(64 << 20)
    rows_out = []
    for queries in (16, 1):
        fns = {k: attention_step(lib, queries) for k, lib in libs.items()}
        torch.testing.assert_close(fns["a"](), fns["b"](), rtol=1e-5, atol=1e-5)
        for cache in ("hot", "cold"):
            load, t = os.getloadavg()[0], {"a": [], "b": []}
            for r in range(repeats):
                for k in ("a", "b") if r % 2 == 0 else ("b", "a"):
                    if cache == "cold":
                        flush.sum()
                    else:
                        fns[k]()
                    t0 = time.perf_counter()
                    fns[k]()
                    t[k].append(time.perf_counter() - t0)
            rows_out.append(summary({"queries": queries, "cache": cache, "load_avg_1m": load}, t))
    return rows_out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", default="packed_linear", choices=KERNELS)
    p.add_argument("--rev", default="HEAD", help="git revision of the A source")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--a-isa", default=None, choices=sorted(cpu_build.ISA_FLAGS),
                   help="build A for this ISA (B: the one in force); with --rev HEAD and an "
                        "unchanged kernel, an A/B of two ISAs (packed_linear, decode_attention)")
    p.add_argument("--a-path", default=None,
                   help="int8_linear: run A on this path of its build (e.g. avx2 where B runs "
                        "avx2-vnni): an A/B of two code paths")
    p.add_argument("--tag", default="", help="appended to the result file's name (keeps an "
                                              "A/B against another revision beside this one)")
    args = p.parse_args(argv)
    if args.a_isa and args.kernel == "int8_linear":
        p.error("--a-isa: int8_linear's path follows the ISA in force; use NBP_CPU_ISA")
    cpu_build.configure_threads(args.threads)
    isa, why = cpu_build.cpu_isa()
    a_isa = args.a_isa or isa
    with tempfile.TemporaryDirectory() as tmp:
        # one folder a side: a quoted #include looks in the source's own folder first
        a_dir, b_dir = Path(tmp) / "a", Path(tmp) / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        old = revision_source(args.rev, args.kernel, a_dir)
        new = (cpu_build.SOURCES / f"{args.kernel}.c").read_text()
        libs = {"a": build(old, args.kernel, a_isa, a_dir / "a.so", a_dir),
                "b": build(new, args.kernel, isa, b_dir / "b.so", cpu_build.SOURCES)}
        rows = (int8_rows(libs, args.repeats, args.a_path) if args.kernel == "int8_linear" else
                {"packed_linear": linear_rows, "decode_attention": attention_rows}[args.kernel](
                    libs, args.repeats))
    info = dict(machine_info("cpu"), isa=isa, isa_reason=why)
    a_commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev],
                              check=True, capture_output=True, text=True).stdout.strip()
    result = {"what": __doc__.split("\n\n")[0], "kernel": args.kernel, "a": args.rev,
              "a_commit": a_commit,
              "a_isa": a_isa, "b": "working tree", "b_isa": isa, "machine": info, "rows": rows}
    name = "" if args.kernel == "packed_linear" else f"{args.kernel}_"
    where = int8_linear.kernel_path()[0] if args.kernel == "int8_linear" else \
        isa if a_isa == isa else f"{a_isa}_vs_{isa}"
    if args.a_path:
        where = f"{args.a_path}_vs_{where}"
    out = RESULTS / f"cpu_kernel_ab_{name}{where}_{machine_tag(info)}{args.tag}.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
