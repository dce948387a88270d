# ruff: noqa: I001  (nbp is imported before torch on purpose)
"""A/B of ``nbp_kernels/cpu/packed_linear.c``: a git revision against the working tree.

Both sources are compiled with ``cpu_build``'s flags for the ISA in force
(``NBP_CPU_ISA``) into a temporary directory and called side by side, round-robin
(medians and bests): the K600 vocabulary head (64000 x 384) and one decode
step's linears (6 layers x 384 + head) at 1 and 16 rows, per weight dtype.
Writes benchmarks/results/cpu_kernel_ab_<isa>_<machine>.json.

    python benchmarks/ablations/cpu_kernel_ab.py --rev HEAD~1 --repeats 15
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
from pathlib import Path

import torch

from nbp.commands.bench import machine_info, machine_tag, time_interleaved
from nbp.io import atomic_write_text
from nbp_kernels import cpu_build, reference
from nbp_kernels.packed_linear import WEIGHT_DTYPES, _bind, pack_weight

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
SRC = "nbp_kernels/cpu/packed_linear.c"


def git_show(rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def revision_source(rev: str, dest: Path) -> str:
    """``SRC`` as of ``rev``, with that revision's headers (cpu/*.h) written into ``dest``, so
    each side compiles against the headers it was written for."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev,
                            f"{Path(SRC).parent}/"], check=True, capture_output=True,
                           text=True).stdout.split()
    for name in names:
        if name.endswith(".h"):
            (dest / Path(name).name).write_text(git_show(rev, name))
    return git_show(rev, SRC)


def build(source: str, isa: str, out: Path, include: Path) -> ctypes.CDLL:
    """``source`` compiled as cpu_build does for ``isa``, its headers from ``include``."""
    src = out.with_suffix(".c")
    src.write_text(source)
    subprocess.run([os.environ.get("CC", "cc"), *cpu_build.FLAGS, *cpu_build.ISA_FLAGS[isa],
                    f"-DNBP_ISA_{isa.upper()}=1", f"-I{include}", str(src), "-o", str(out),
                    *cpu_build.LIBS.get("packed_linear", [])], check=True)
    return _bind(ctypes.CDLL(str(out)))


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rev", default="HEAD", help="git revision of the A source")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    cpu_build.configure_threads(args.threads)
    isa, why = cpu_build.cpu_isa()
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        # one folder a side: a quoted #include looks in the source's own folder first
        a_dir, b_dir = Path(tmp) / "a", Path(tmp) / "b"
        a_dir.mkdir()
        b_dir.mkdir()
        old = revision_source(args.rev, a_dir)
        libs = {"a": build(old, isa, a_dir / "a.so", a_dir),
                "b": build((ROOT / SRC).read_text(), isa, b_dir / "b.so", cpu_build.SOURCES)}
        for what, mods in layers().items():
            for rows in (1, 16):
                for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                    ("int8", torch.int8)):
                    fns = {k: call(lib, mods, dtype, rows) for k, lib in libs.items()}
                    torch.testing.assert_close(fns["a"]().clone(), fns["b"](), rtol=1e-5, atol=1e-5)
                    load = os.getloadavg()[0]
                    t = time_interleaved(fns, args.repeats)
                    row = {"what": what, "rows": rows, "dtype": name, "load_avg_1m": load,
                           **{f"{k}_median_ms": statistics.median(v) * 1e3 for k, v in t.items()},
                           **{f"{k}_best_ms": min(v) * 1e3 for k, v in t.items()}}
                    row["a_over_b_median"] = row["a_median_ms"] / row["b_median_ms"]
                    rows_out.append(row)
                    print(f"{what:>4} rows={rows:>2} {name:>8}: A {row['a_median_ms']:7.2f} ms  "
                          f"B {row['b_median_ms']:7.2f} ms  A/B {row['a_over_b_median']:.2f}  "
                          f"(load {load:.1f})")
    info = dict(machine_info("cpu"), isa=isa, isa_reason=why)
    result = {"what": __doc__.split("\n\n")[0], "a": args.rev, "b": "working tree",
              "machine": info, "rows": rows_out}
    out = RESULTS / f"cpu_kernel_ab_{isa}_{machine_tag(info)}.json"
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
