"""Measure the decode step per backend on this GPU; write the tuning table and a results table.

1. For every (head_dim, block_size, dtype) the registry's ``auto`` may meet, times
   ``block_decode_attention`` (fused append + attend) and ``kv_append_`` on the
   ``cuda``, ``triton`` and ``torch`` backends and records the fastest in
   ``nbp_kernels/tuning.json`` (merged with existing entries, atomic write).
2. At the 700M shape (16 queries, 1280 cached, 16 heads x 96, bf16, batch 1
   and 8) prints and saves a table of decode-step attention time and GB/s:
   CUDA vs Triton vs SDPA vs FlexAttention, against the bytes / copy-bandwidth
   floor (bandwidth measured with a large device-to-device copy).

Times are CUDA-graph replays (the engine captures its decode step), median of
several replays of ``--reps`` calls each. Usage (GPU only)::

    python benchmarks/tune_decode.py [--quick] [--no-write] [--no-table] [--out DIR]

``--out DIR`` puts the table (``decode_attention_<card>.md``) and a copy of
the new ``tuning.json`` in DIR (default: the table in ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nbp_kernels
from nbp.io import atomic_write_text
from nbp_kernels.registry import TUNING_FILE, backend_status, backends_for

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEVICE = "cuda"


def time_us(fns, reps: int, trials: int = 5) -> float:
    """Median µs per call, calling ``fns`` (one function or a rotation) from a CUDA graph replay.

    Falls back to eager timing if the calls cannot be captured.
    """
    fns = fns if isinstance(fns, (list, tuple)) else [fns]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()

    def loop():
        for i in range(reps):
            fns[i % len(fns)]()

    try:
        with torch.cuda.graph(graph):
            loop()
        run = graph.replay
    except Exception:  # an op that cannot be captured is timed eagerly
        run = loop
    run()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), reps=10)
    return 2 * n / (us * 1e-6)


def make_case(B, H, L, D, cached, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=DEVICE).to(dtype)
    M = cached + L
    return dict(q=r(B, H, L, D), k_cache=r(B, H, M, D), v_cache=r(B, H, M, D), k_new=r(B, H, L, D),
                v_new=r(B, H, L, D), seq_lens=torch.full((B,), cached, dtype=torch.int32, device=DEVICE))


def make_cases(B, H, L, D, cached, dtype) -> list[dict]:
    """Enough independent caches that cycling through them streams from HBM, not L2.

    A real decode step reads a different layer's cache each call; one cache
    reused every call would sit in L2 at small batch and beat the HBM floor.
    """
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    nbytes = step_bytes(B, H, L, D, cached, torch.empty((), dtype=dtype).element_size())
    return [make_case(B, H, L, D, cached, dtype, seed=i) for i in range(max(1, -(-2 * l2 // nbytes)))]


def step_bytes(B, H, L, D, cached, elem) -> int:
    """Minimum traffic of a fused step: visible K and V, q, out, and the new block read + written."""
    return elem * D * H * B * (2 * (cached + L) + 2 * L + 4 * L)


def rotate(build, cases) -> list:
    """``build(case)`` for every case: the functions time_us cycles through."""
    return [build(c) for c in cases]


def decode_fn(case, backend, fused=True):
    new = dict(k_new=case["k_new"], v_new=case["v_new"]) if fused else {}
    return lambda: nbp_kernels.block_decode_attention(case["q"], case["k_cache"], case["v_cache"],
                                                      case["seq_lens"], backend=backend,
                                                      check_bounds=False, **new)


def sdpa_fn(case):
    L, M = case["q"].shape[2], case["k_cache"].shape[2]
    visible = torch.arange(M, device=DEVICE)[None, :] < (case["seq_lens"].long()[:, None] + L)
    mask = visible[:, None, None, :]
    return lambda: F.scaled_dot_product_attention(case["q"], case["k_cache"], case["v_cache"], attn_mask=mask)


def flex_fn(case):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    global _FLEX
    _FLEX = _FLEX or torch.compile(flex_attention, dynamic=False)
    B, _, L, _ = case["q"].shape
    M = case["k_cache"].shape[2]
    limit = case["seq_lens"] + L
    block_mask = create_block_mask(lambda b, h, qi, ki: ki < limit[b], B, None, L, M, device=DEVICE)
    return lambda: _FLEX(case["q"], case["k_cache"], case["v_cache"], block_mask=block_mask)


_FLEX = None
SPLIT_SWEEP = (1, 2, 3, 4, 6, 8, 11, 16, 24)


def split_sweep_row(cases: list[dict], B: int) -> str:
    if not backend_status("cuda", DEVICE)[0]:
        return f"| {B} | cuda backend unusable |"
    from nbp_kernels import cuda_ops

    q = cases[0]["q"]
    _, H, L, D = q.shape
    chosen = cuda_ops._C.num_splits(B, H, L, cases[0]["k_cache"].shape[2], D, cuda_ops.DTYPE_CODES[q.dtype],
                                    torch.cuda.get_device_properties(q.device).multi_processor_count)
    cells = []
    for s in SPLIT_SWEEP:
        fns = rotate(lambda c, s=s: lambda: torch.ops.nbp.cuda_block_decode_attention(
            c["q"], c["k_cache"], c["v_cache"], c["seq_lens"], c["k_new"], c["v_new"], D ** -0.5, s), cases)
        cells.append(f"{time_us(fns, 50):.2f}" + ("*" if s == chosen else ""))
    return f"| {B} | " + " | ".join(cells) + " |"


def tune_shape(device_name: str, usable: list[str], dname: str, D: int, L: int, reps: int) -> list[dict]:
    """Fastest usable backend for each op at one (dtype, head_dim, L), batch 8, 16 heads, 1280 cached."""
    cases = make_cases(8, 16, L, D, 1280, DTYPES[dname])
    append = lambda b: (lambda c: lambda: nbp_kernels.kv_append_(c["k_cache"], c["v_cache"], c["k_new"], c["v_new"],
                                                                 c["seq_lens"], backend=b, check_bounds=False))
    ops = (("block_decode_attention", lambda b: (lambda c: decode_fn(c, b))), ("kv_append_", append))
    entries = []
    for op, make in ops:
        us = {}
        for b in usable:
            try:
                us[b] = round(time_us(rotate(make(b), cases), reps), 2)
            except Exception as e:  # a backend without this shape is simply not a candidate
                print(f"  {op} {b} D={D} L={L} {dname}: {type(e).__name__}: {e}")
        if us:
            best = min(us, key=us.get)
            entries.append(dict(op=op, head_dim=D, block_size=L, dtype=dname, device=device_name,
                                backend=best, us=us))
            print(f"{op:24s} D={D:3d} L={L:2d} {dname:8s} " +
                  " ".join(f"{b}={t:8.2f}us" for b, t in us.items()) + f"  -> {best}")
    return entries


def tune(device_name: str, reps: int, budget_s: float) -> list[dict]:
    """Dispatch entries for every (dtype, head_dim in 64/96/128, L in 1/16).

    The 700M model's shapes (D = 96) come first; shapes left when ``budget_s`` runs out are skipped.
    """
    usable = [b for b in backends_for("block_decode_attention")
              if b != "reference" and backend_status(b, DEVICE)[0]]
    grid = [(dn, D, L) for dn in DTYPES for D in (96, 64, 128) for L in (16, 1)]
    deadline = time.monotonic() + budget_s
    entries = []
    for i, (dname, D, L) in enumerate(grid):
        if time.monotonic() > deadline:
            print(f"time budget spent: {len(grid) - i} of {len(grid)} shapes not tuned")
            break
        entries += tune_shape(device_name, usable, dname, D, L, reps)
    return entries


def write_tuning(entries: list[dict], device_name: str) -> None:
    old = json.loads(TUNING_FILE.read_text()).get("entries", []) if TUNING_FILE.exists() else []
    keys = {(e["op"], e["head_dim"], e["block_size"], e["dtype"], e["device"]) for e in entries}
    kept = [e for e in old if (e["op"], e["head_dim"], e["block_size"], e["dtype"], e["device"]) not in keys]
    text = json.dumps({"entries": kept + entries}, indent=1) + "\n"
    atomic_write_text(TUNING_FILE, text)
    print(f"wrote {len(entries)} entries for {device_name!r} to {TUNING_FILE}")


def table(device_name: str, bw: float, reps: int) -> str:
    H, L, D, cached, dtype = 16, 16, 96, 1280, torch.bfloat16
    rows = ["| batch | variant | µs | GB/s | × floor |", "|---|---|---|---|---|"]
    sweep = []
    for B in (1, 8):
        cases = make_cases(B, H, L, D, cached, dtype)
        nbytes = step_bytes(B, H, L, D, cached, 2)
        floor = nbytes / bw * 1e6
        rows.append(f"| {B} | floor (bytes / copy bandwidth, {nbytes / 1e6:.1f} MB) | {floor:.2f} | "
                    f"{bw / 1e9:.0f} | 1.00 |")
        variants = [("CUDA fused append+attend", lambda c: decode_fn(c, "cuda")),
                    ("CUDA attend only", lambda c: decode_fn(c, "cuda", fused=False)),
                    ("Triton fused append+attend", lambda c: decode_fn(c, "triton")),
                    ("Triton attend only", lambda c: decode_fn(c, "triton", fused=False)),
                    ("torch backend (scatter + SDPA)", lambda c: decode_fn(c, "torch")),
                    ("SDPA attend only (masked)", sdpa_fn),
                    ("FlexAttention attend only", flex_fn)]
        for name, build in variants:
            try:
                us = time_us(rotate(build, cases), reps)
                rows.append(f"| {B} | {name} | {us:.2f} | {nbytes / us / 1e3:.0f} | {us / floor:.2f} |")
            except Exception as e:
                rows.append(f"| {B} | {name} | n/a ({type(e).__name__}: {str(e)[:60]}) | | |")
        sweep.append(split_sweep_row(cases, B))
    rows += ["", "CUDA kernel, KV split count sweep (µs; * = the shape heuristic's choice):", "",
             "| batch | " + " | ".join(f"S={s}" for s in SPLIT_SWEEP) + " |",
             "|---|" + "---|" * len(SPLIT_SWEEP), *sweep]
    head = (f"# Decode-step attention on {device_name}\n\n"
            f"Shape: L={L} queries, {cached} cached, {H} heads x {D}, bf16; torch {torch.__version__}. "
            f"µs per call from CUDA-graph replays cycling through enough separate caches to exceed 2x L2 "
            f"(as a decoder reads a new layer's cache each call); GB/s counts the fused step's minimum "
            f"bytes for every row. Copy bandwidth (1 GiB D2D, read+write): {bw / 1e9:.0f} GB/s.\n\n")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-write", action="store_true", help="print only; write no files")
    ap.add_argument("--no-table", action="store_true", help="only the tuning grid (tuning.json), no table")
    ap.add_argument("--budget-s", type=float, default=600.0, help="time limit for the tuning grid")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for the table (and a tuning.json copy)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_decode.py needs a CUDA device")
    reps = 20 if args.quick else 100
    name = torch.cuda.get_device_name()
    print(f"device: {name}  (torch {torch.__version__}, cuda backend: {backend_status('cuda', 'cuda')})")
    bw = copy_bandwidth()
    print(f"copy bandwidth: {bw / 1e9:.0f} GB/s")
    md = None if args.no_table else table(name, bw, reps)
    if md:
        print(md)
    entries = tune(name, reps, args.budget_s)
    if not args.no_write:
        write_tuning(entries, name)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.out.resolve() != RESULTS.resolve():
            atomic_write_text(args.out / "tuning.json", TUNING_FILE.read_text())
        if md:
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            atomic_write_text(args.out / f"decode_attention_{slug}.md", md)
            print(f"wrote {args.out / f'decode_attention_{slug}.md'}")


if __name__ == "__main__":
    main()
