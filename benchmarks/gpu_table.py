"""GPU table of the attention kernels: prefill TFLOP/s and decode-step µs / GB/s.

    python3 benchmarks/gpu_table.py --out DIR            # on a CUDA machine
    TRITON_INTERPRET=1 python3 benchmarks/gpu_table.py --tiny --out DIR   # CPU smoke run

Prefill: NBP block-causal attention (L = 16, no condition), bf16, 16 heads,
head_dim 128 and 96, S = 1024 / 1280 / 4096 with B * S = 8192 tokens; Triton vs
FlexAttention (block mask) vs SDPA (dense boolean mask), and SDPA's causal
flash kernel as a ceiling on a different mask. TFLOP/s count only the useful
work, 4 * D * (visible query-key pairs) per head (x 3.5 for forward+backward,
the usual 2.5x backward convention). Decode: 16 queries against 1280 cached
positions x 16 heads x 96, batch 1 and 8, timed in a CUDA graph (no launch
overhead); GB/s from the bytes that must move (K, V, q, out, and the new block
for the fused append) and the ratio to the card's bandwidth floor.

Writes DIR/attention_<card>.md and .json (atomically) and prints the markdown.
"""
import argparse
import importlib
import json
import math
import statistics
import time
from pathlib import Path

import torch

from attention_impls import decode_impls, prefill_backward_impls, prefill_impls, visible_pairs
from harness import gpu_table_device, write_table

# Peak HBM bandwidth (bytes/s) by device-name fragment, first match wins.
PEAK_BW = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
           ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12)]
PREFILL_IMPLS = ["triton", "flex_block_mask", "sdpa_dense_mask", "sdpa_causal_ref"]
DECODE_IMPLS = ["triton_fused_append", "triton", "sdpa_sliced_cache", "torch"]


def time_ms(fn, graph: bool = False) -> float:
    """Median milliseconds per call: do_bench (or do_bench_cudagraph) on CUDA, wall clock on CPU."""
    fn()
    if not torch.cuda.is_available():
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)
    import triton.testing as tt
    torch.cuda.synchronize()
    if graph:
        try:
            return tt.do_bench_cudagraph(fn, rep=50, return_mode="median")
        except TypeError:  # older triton without return_mode
            return tt.do_bench_cudagraph(fn, rep=50)
    return tt.do_bench(fn, warmup=10, rep=50, return_mode="median")


class Budget:
    """Wall-clock budget: optional entries (FlexAttention builds) are skipped once it is spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.end


def _measure(name, fn, budget, graph=False):
    """(ms, note): the timing, or None with the reason it was not measured."""
    if isinstance(fn, str):
        return None, fn
    if name.startswith("flex") and not budget.left():
        return None, "skipped: time budget spent (FlexAttention compiles per shape)"
    try:
        return time_ms(fn, graph), ""
    except Exception as e:  # one failing baseline must not lose the rest of the table
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"


def _measure_impls(row: dict, impls: dict, flops: float, budget, missing: str) -> None:
    """row[name] = {ms, tflops, note} for every prefill implementation (``missing``: the
    note of one that ``impls`` lacks)."""
    for name in PREFILL_IMPLS:
        ms, note = _measure(name, impls.get(name, missing), budget)
        row[name] = dict(ms=ms, tflops=None if ms is None else flops / ms / 1e9, note=note)


def _max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def prefill_rows(cfg, budget):
    rows = []
    for S in cfg["seqs"]:
        for D in cfg["head_dims"]:
            B = max(1, cfg["tokens"] // S)
            q, k, v = (torch.randn(B, cfg["heads"], S, D, device=cfg["device"], dtype=cfg["dtype"])
                       for _ in range(3))
            impls = prefill_impls(q, k, v, block_size=cfg["block"], interpreter_ok=cfg["tiny"])
            flops = 4 * B * cfg["heads"] * D * visible_pairs(S, cfg["block"])
            row = dict(kind="fwd", S=S, D=D, B=B, H=cfg["heads"], gflop=flops / 1e9)
            if not isinstance(impls["triton"], str):
                row["triton_max_err_vs_sdpa"] = _max_err(impls["triton"](), impls["sdpa_dense_mask"]())
            _measure_impls(row, impls, flops, budget, missing="not applicable here")
            rows.append(row)
            print(_row_line(row), flush=True)
    return rows


def backward_rows(cfg, budget):
    rows = []
    S = cfg["bwd_seq"]
    for D in cfg["head_dims"]:
        B = max(1, cfg["tokens"] // S)
        q, k, v = (torch.randn(B, cfg["heads"], S, D, device=cfg["device"], dtype=cfg["dtype"],
                               requires_grad=True) for _ in range(3))
        impls = prefill_backward_impls(q, k, v, block_size=cfg["block"], interpreter_ok=cfg["tiny"])
        flops = 3.5 * 4 * B * cfg["heads"] * D * visible_pairs(S, cfg["block"])
        row = dict(kind="fwd+bwd", S=S, D=D, B=B, H=cfg["heads"], gflop=flops / 1e9)
        _measure_impls(row, impls, flops, budget, missing="no backward measured")
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def _split_sweep(q, kc, vc, seq_lens, cfg) -> dict:
    """µs of the Triton decode (no append) per forced split count: tuning data for choose_splits."""
    from nbp_kernels.ops import block_decode_attention
    out = {}
    for splits in cfg["split_sweep"]:
        ms, note = _measure("triton", lambda: block_decode_attention(q, kc, vc, seq_lens, num_splits=splits),
                            None, graph=cfg["device"].type == "cuda")
        out[splits] = note if ms is None else 1e3 * ms
    return out


def decode_rows(cfg, budget, peak_bw):
    rows = []
    H, L, D, n = cfg["heads"], cfg["block"], cfg["dec_head_dim"], cfg["cached"]
    elt = torch.tensor([], dtype=cfg["dtype"]).element_size()
    for B in cfg["batches"]:
        def rnd(*shape):
            return torch.randn(*shape, device=cfg["device"], dtype=cfg["dtype"])
        q, kn, vn = rnd(B, H, L, D), rnd(B, H, L, D), rnd(B, H, L, D)
        kc, vc = rnd(B, H, cfg["max_seq"], D), rnd(B, H, cfg["max_seq"], D)
        seq_lens = torch.full((B,), n, dtype=torch.int32, device=cfg["device"])
        kc[:, :, n:n + L], vc[:, :, n:n + L] = kn, vn  # the unfused variants see the same block
        impls = decode_impls(q, kc, vc, seq_lens, kn, vn, n + L, interpreter_ok=cfg["tiny"])
        base = B * H * D * elt * (2 * (n + L) + 2 * L)  # K, V read; q read; out written
        row = dict(B=B, H=H, L=L, D=D, cached=n, max_seq=cfg["max_seq"], bytes=base)
        if not isinstance(impls["triton"], str):
            from nbp_kernels.ops.block_decode_attention import choose_splits
            row["splits"] = choose_splits(B, H, L, cfg["max_seq"], q.device)
            row["triton_max_err_vs_sdpa"] = _max_err(impls["triton"](), impls["sdpa_sliced_cache"]())
        if not isinstance(impls["triton"], str):
            row["triton_us_by_splits"] = _split_sweep(q, kc, vc, seq_lens, cfg)
        for name in DECODE_IMPLS:
            nbytes = base + (4 * B * H * L * D * elt if name == "triton_fused_append" else 0)
            ms, note = _measure(name, impls[name], budget, graph=cfg["device"].type == "cuda")
            us = None if ms is None else 1e3 * ms
            row[name] = dict(us=us, gbps=None if ms is None else nbytes / ms / 1e6, note=note,
                             floor_us=None if peak_bw is None else 1e6 * nbytes / peak_bw)
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def sweep_rows(cfg, budget):
    """Forward TFLOP/s of other Triton tilings at S = bwd_seq: tuning data, not the defaults."""
    bca = importlib.import_module("nbp_kernels.ops.block_causal_attention")
    rows = []
    S = cfg["bwd_seq"]
    for D in cfg["head_dims"]:
        B = max(1, cfg["tokens"] // S)
        q, k, v = (torch.randn(B, cfg["heads"], S, D, device=cfg["device"], dtype=cfg["dtype"])
                   for _ in range(3))
        flops = 4 * B * cfg["heads"] * D * visible_pairs(S, cfg["block"])
        row = dict(S=S, D=D, B=B, H=cfg["heads"], default=list(bca._tiles("fwd", q.dtype, D)), tflops={})
        for tiles in cfg["sweep"]:
            if not budget.left():
                row["tflops"][str(tiles)] = "skipped: sweep budget spent"
                continue
            bca.TILE_OVERRIDES["fwd"] = tiles
            try:
                ms = time_ms(lambda: bca.forward(q, k, v, cfg["block"], 0, False, 1 / math.sqrt(D)))
                row["tflops"][str(tiles)] = flops / ms / 1e9
            except Exception as e:  # e.g. a tiling that needs more shared memory than the card has
                row["tflops"][str(tiles)] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
            finally:
                bca.TILE_OVERRIDES.clear()
        rows.append(row)
        print(_row_line(row), flush=True)
    return rows


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def _row_line(row) -> str:
    return json.dumps(row, default=str)


def markdown(result) -> str:
    lines = [f"# Attention kernels on {result['device']}", "",
             f"torch {result['torch']}, triton {result['triton']}, dtype {result['dtype']}, "
             f"NBP mask with L = {result['block']}, cond_len 0. TFLOP/s count useful work only.", "",
             "## Prefill (TFLOP/s; ms in brackets)", "",
             "| kind | S | D | B×H | " + " | ".join(PREFILL_IMPLS) + " | triton err vs SDPA |",
             "|" + "---|" * (5 + len(PREFILL_IMPLS))]
    for r in result["prefill"]:
        cells = [f"{_fmt(r[n]['tflops'])} ({_fmt(r[n]['ms'], '.3f')})" if r[n]["ms"] is not None
                 else f"— ({r[n]['note'][:60]})" for n in PREFILL_IMPLS]
        err = r.get("triton_max_err_vs_sdpa")
        lines.append(f"| {r['kind']} | {r['S']} | {r['D']} | {r['B']}×{r['H']} | " + " | ".join(cells)
                     + f" | {_fmt(err, '.2e')} |")
    lines += ["", f"## Decode step (µs; achieved GB/s; × floor at {result['peak_bw_gbps']} GB/s)", "",
              "| B | H×L×D | cached | splits | " + " | ".join(DECODE_IMPLS) + " | triton err vs SDPA |",
              "|" + "---|" * (5 + len(DECODE_IMPLS))]
    for r in result["decode"]:
        cells = []
        for n in DECODE_IMPLS:
            c = r[n]
            if c["us"] is None:
                cells.append(f"— ({c['note'][:60]})")
                continue
            ratio = "" if c["floor_us"] is None else f", {c['us'] / c['floor_us']:.2f}× floor"
            cells.append(f"{c['us']:.1f} µs ({c['gbps']:.0f} GB/s{ratio})")
        shape = f"{r['H']}×{r['L']}×{r['D']}"
        lines.append(f"| {r['B']} | {shape} | {r['cached']} | {r.get('splits', '—')} | "
                     + " | ".join(cells) + f" | {_fmt(r.get('triton_max_err_vs_sdpa'), '.2e')} |")
    for r in result["decode"]:
        if "triton_us_by_splits" in r:
            cells = ", ".join(f"{k}: {_fmt(v) if not isinstance(v, str) else v}"
                              for k, v in r["triton_us_by_splits"].items())
            lines.append(f"\nTriton decode µs by split count, B={r['B']} "
                         f"(chosen {r.get('splits')}): {cells}")
    lines += ["", "## Triton forward tilings (TFLOP/s; BLOCK_M, BLOCK_N, warps, stages)", ""]
    for r in result["sweep"]:
        cells = ", ".join(f"{t}: {_fmt(v) if not isinstance(v, str) else v}" for t, v in r["tflops"].items())
        lines.append(f"- S={r['S']} D={r['D']} B×H={r['B']}×{r['H']} "
                     f"(default {tuple(r['default'])}): {cells}")
    return "\n".join(lines) + "\n"


def config(tiny: bool) -> dict:
    base = dict(device=gpu_table_device("gpu_table.py", tiny), tiny=tiny, block=16)
    if tiny:
        return base | dict(dtype=torch.float32, heads=2, seqs=[40], head_dims=[64, 96], tokens=40,
                           bwd_seq=40, dec_head_dim=96, cached=24, max_seq=48, batches=[1, 2],
                           sweep=[(16, 16, 1, 1), (32, 16, 1, 1)], split_sweep=[1, 3])
    return base | dict(dtype=torch.bfloat16, heads=16, seqs=[1024, 1280, 4096], head_dims=[128, 96],
                       tokens=8192, bwd_seq=1280, dec_head_dim=96, cached=1280, max_seq=2048,
                       batches=[1, 8], split_sweep=[1, 2, 4, 8, 12, 16, 24, 32],
                       sweep=[(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                              (128, 32, 4, 4), (64, 128, 4, 3)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for the .md and .json tables")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run of this script)")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="seconds after which optional FlexAttention entries are skipped")
    ap.add_argument("--sweep-s", type=float, default=40.0,
                    help="seconds for the (optional) sweep of Triton forward tilings, run last")
    args = ap.parse_args(argv)
    cfg = config(args.tiny)
    budget = Budget(args.budget_s)
    # FlexAttention compiles once per shape and grad mode (8 here): stay above dynamo's
    # default recompile limit, past which it would silently fall back to eager.
    import torch._dynamo
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    name = torch.cuda.get_device_name() if cfg["device"].type == "cuda" else "cpu"
    peak = next((bw for frag, bw in PEAK_BW if frag in name), None)
    import triton
    result = dict(device=name, torch=torch.__version__, triton=triton.__version__,
                  dtype=str(cfg["dtype"]).replace("torch.", ""), block=cfg["block"],
                  peak_bw_gbps=None if peak is None else peak / 1e9,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    result["prefill"] = prefill_rows(cfg, budget) + backward_rows(cfg, budget)
    result["decode"] = decode_rows(cfg, budget, peak)
    result["sweep"] = sweep_rows(cfg, Budget(args.sweep_s))
    text = markdown(result)
    write_table(args.out, "attention", name, result, text)
    print(text)


if __name__ == "__main__":
    main()
