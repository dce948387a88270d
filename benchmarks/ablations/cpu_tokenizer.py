"""The video tokenizer at the published size on the CPU, against the matmul rate of the same run.

For each variant (dtype x memory layout) this times ``VideoTokenizer.encode`` of
one clip (default 17x128x128, the published clip) and ``decode`` of its codes,
with random weights of the ``magvit2`` preset (370M parameters; speed does not
depend on the weights). Around every call it measures the dense matmul rate of
the same process (an n x n ``torch.mm`` at the variant's dtype and at fp32,
run for ``--mm-seconds``), so each row reports

    ratio = achieved conv FLOP/s of the call / fp32 matmul FLOP/s around it,

which stays meaningful on a busy machine where absolute times do not, and the
same ratio per CPU second of this process (``ratio_per_cpu_second``: time taken
by other processes drops out; OpenMP threads spinning while a sibling waits for
a core still count). FLOPs
are ``VideoTokenizer.flops`` (every Conv3d, 2 per multiply-add). The peak
resident memory of each call is read from ``VmHWM`` after resetting it
(``/proc/self/clear_refs``).

Layouts (``VideoTokenizer.cpu_memory_format``, the layout of the activations;
the weights stay as loaded): ``cf`` (channels first, ``torch.contiguous_format``)
and ``cl`` (``torch.channels_last_3d``, ``nbp``'s default). bf16 runs where the CPU has
native bf16 matmul (``amx_bf16`` or ``avx512_bf16``; ``--bf16 auto``); elsewhere
only its matmul rate is recorded, since emulated bf16 is several times slower
than fp32. Reconstruction of each variant is checked on the shipped demo
tokenizer (``nbp.demo``) with held-out clips: PSNR against the input.

Writes ``benchmarks/results/cpu_tokenizer_<preset>_<machine>.json`` (atomically).
Run from the repository root with this checkout importable, e.g.
``PYTHONPATH=. python benchmarks/ablations/cpu_tokenizer.py --repeats 2``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from nbp.commands.bench import machine_info, machine_tag
from nbp.devices import native_bf16_matmul
from nbp.io import atomic_write_text
from nbp.tokenizer import TokenizerConfig, VideoTokenizer
from nbp_kernels.cpu_build import cpu_flags

LAYOUTS = {"cf": torch.contiguous_format, "cl": torch.channels_last_3d}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
RESULTS = Path(__file__).resolve().parents[1] / "results"


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def matmul_gflops(dtype: torch.dtype, n: int, seconds: float) -> tuple[float, float]:
    """Back-to-back n x n ``torch.mm`` at ``dtype`` for about ``seconds``: (GFLOP per wall second,
    GFLOP per CPU second of this process, all threads summed)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)
    calls, t0, c0 = 0, time.perf_counter(), time.process_time()
    while calls == 0 or time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        calls += 1
    gflop = 2 * n ** 3 * calls / 1e9
    return gflop / (time.perf_counter() - t0), gflop / max(time.process_time() - c0, 1e-9)


def set_variant(model: VideoTokenizer, dtype: torch.dtype, layout: str) -> VideoTokenizer:
    """Cast the model in place to ``dtype`` and run its CPU activations in ``layout``."""
    model.cpu_memory_format = LAYOUTS[layout]
    return model.to(dtype=dtype)


def timed_call(fn) -> dict:
    """Run ``fn()`` once: wall seconds, CPU seconds, peak and starting RSS (MiB), load average."""
    before = _status_kb("VmRSS")
    reset = reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _status_kb("VmHWM") if reset else None
    return {"out": out, "seconds": wall, "cpu_seconds": cpu, "rss_before_mib": mib(before),
            "peak_rss_mib": mib(peak), "load_avg_1m": os.getloadavg()[0]}


def measure_op(fn, dtype: torch.dtype, args) -> dict:
    """One timed call with the matmul rates (fp32 and ``dtype``) measured right before and after it."""
    mm32 = [matmul_gflops(torch.float32, args.mm_size, args.mm_seconds)]
    mmdt = [matmul_gflops(dtype, args.mm_size, args.mm_seconds)] if dtype != torch.float32 else []
    run = timed_call(fn)
    mm32.append(matmul_gflops(torch.float32, args.mm_size, args.mm_seconds))
    if dtype != torch.float32:
        mmdt.append(matmul_gflops(dtype, args.mm_size, args.mm_seconds))
    run["matmul_fp32_gflops"] = statistics.mean(m[0] for m in mm32)
    run["matmul_fp32_gflop_per_cpu_s"] = statistics.mean(m[1] for m in mm32)
    run["matmul_dtype_gflops"] = statistics.mean(m[0] for m in mmdt or mm32)
    return run


def one_round(model: VideoTokenizer, video: torch.Tensor, variants, args) -> list[dict]:
    """Encode then decode once for every (dtype, layout) variant: one sample per (variant, op)."""
    samples = []
    for dtype_name, layout in variants:
        dtype = DTYPES[dtype_name]
        set_variant(model, dtype, layout)
        x = video.to(dtype=dtype)
        with torch.no_grad():
            enc = measure_op(partial(model.encode, x), dtype, args)
            dec = measure_op(partial(model.decode, enc["out"]), dtype, args)
        for op, run in (("encode", enc), ("decode", dec)):
            run.pop("out")
            samples.append({"dtype": dtype_name, "layout": layout, "op": op, **run})
        print(f"  {dtype_name} {layout}: encode {enc['seconds']:.1f} s, decode {dec['seconds']:.1f} s "
              f"(fp32 mm {enc['matmul_fp32_gflops']:.0f} / {dec['matmul_fp32_gflops']:.0f} GFLOP/s, "
              f"load {dec['load_avg_1m']:.1f})", flush=True)
    return samples


def summarize(samples: list[dict], flops: dict) -> list[dict]:
    """One row per (dtype, layout, op): the medians of its samples and the per-call ratios."""
    rows = []
    keys = sorted({(s["dtype"], s["layout"], s["op"]) for s in samples})
    for dtype, layout, op in keys:
        mine = [s for s in samples if (s["dtype"], s["layout"], s["op"]) == (dtype, layout, op)]
        achieved = [flops[op] / s["seconds"] / 1e9 for s in mine]
        ratios = [a / s["matmul_fp32_gflops"] for a, s in zip(achieved, mine)]
        # per CPU second of this process: what other processes take from it does not count
        cpu_ratios = [flops[op] / s["cpu_seconds"] / 1e9 / s["matmul_fp32_gflop_per_cpu_s"] for s in mine]
        rows.append({
            "dtype": dtype, "layout": layout, "op": op, "tflop": flops[op] / 1e12,
            "seconds": [round(s["seconds"], 2) for s in mine],
            "cpu_seconds": [round(s["cpu_seconds"], 2) for s in mine],
            "gflops": [round(a, 1) for a in achieved],
            "matmul_fp32_gflops": [round(s["matmul_fp32_gflops"], 1) for s in mine],
            "matmul_dtype_gflops": [round(s["matmul_dtype_gflops"], 1) for s in mine],
            "ratio_to_fp32_matmul": [round(r, 3) for r in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_best": round(max(ratios), 3),
            "ratio_per_cpu_second": [round(r, 3) for r in cpu_ratios],
            "peak_rss_mib": max((s["peak_rss_mib"] or 0) for s in mine) or None,
            "rss_before_mib": min((s["rss_before_mib"] or 0) for s in mine) or None,
            "load_avg_1m": [round(s["load_avg_1m"], 2) for s in mine]})
    return rows


def reconstruction_psnr(num_clips: int) -> dict:
    """Reconstruction PSNR (dB) of the shipped demo tokenizer on held-out clips, for every dtype x layout."""
    from nbp import demo, metrics

    video, _ = demo.heldout_clips(num_clips)
    tok = demo.load_demo().tokenizer
    out = {}
    for dtype_name, dtype in DTYPES.items():
        for layout in LAYOUTS:
            set_variant(tok, dtype, layout)
            with torch.no_grad():
                out[f"{dtype_name}_{layout}"] = round(metrics.psnr(tok.decode(tok.encode(video)), video), 3)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="magvit2")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128, help="height = width of the clip")
    p.add_argument("--repeats", type=int, default=2, help="rounds over all variants")
    p.add_argument("--layouts", default="cf,cl", help="comma-separated subset of cf,cl")
    p.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                   help="auto: bf16 rows only where the CPU has native bf16 matmul")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--mm-size", type=int, default=2048)
    p.add_argument("--mm-seconds", type=float, default=2.0)
    p.add_argument("--psnr-clips", type=int, default=16)
    p.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    layouts = [s for s in args.layouts.split(",") if s]
    if not layouts or any(s not in LAYOUTS for s in layouts):
        p.error(f"--layouts: expected a comma-separated subset of {sorted(LAYOUTS)}, got {args.layouts!r}")
    for name in ("frames", "size", "repeats", "mm_size", "psnr_clips"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive int, got {args.threads}")
    args.layouts = layouts
    return args


def machine(flags: frozenset[str]) -> dict:
    """machine_info plus the ISA: the relevant CPU flags and torch's CPU capability."""
    return dict(machine_info("cpu"), isa=[f for f in ISA_FLAGS if f in flags],
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                native_bf16_matmul=native_bf16_matmul()[0])


def header(args, info: dict, model: VideoTokenizer, flops: dict, use_bf16: bool) -> dict:
    """The result file's fields that do not depend on the timed rows."""
    return {
        "preset": args.preset, "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "clip": [args.frames, args.size, args.size], "tflop": {k: v / 1e12 for k, v in flops.items()},
        "machine": info, "complete": False,
        "bf16": ("measured" if use_bf16 else "skipped: no native bf16 matmul (amx_bf16 / avx512_bf16) on this CPU"),
        "matmul_gflops_alone": {d: round(matmul_gflops(DTYPES[d], args.mm_size, args.mm_seconds)[0], 1)
                                for d in DTYPES},
        "reconstruction_psnr_demo": reconstruction_psnr(args.psnr_clips)}


def report(result: dict, out: Path) -> None:
    for row in result["rows"]:
        print(f"{row['dtype']:>8} {row['layout']} {row['op']:>6}: {row['seconds']} s, {row['gflops']} GFLOP/s, "
              f"ratio to fp32 matmul {row['ratio_to_fp32_matmul']}, peak RSS {row['peak_rss_mib']} MiB")
    print(f"matmul alone (GFLOP/s): {result['matmul_gflops_alone']}; "
          f"demo reconstruction PSNR: {result['reconstruction_psnr_demo']}")
    print(f"wrote {out}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flags = cpu_flags()
    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and native_bf16_matmul()[0])
    variants = [(d, lay) for d in (["float32", "bfloat16"] if use_bf16 else ["float32"]) for lay in args.layouts]
    info = machine(flags)
    out = args.out or RESULTS / f"cpu_tokenizer_{args.preset}_{machine_tag(info)}.json"
    cfg = TokenizerConfig.from_preset(args.preset)
    cfg.latent_shape(args.frames, args.size, args.size)   # a clip the tokenizer takes, before any work
    torch.manual_seed(0)
    model = VideoTokenizer(cfg).eval()
    flops = model.flops(args.frames, args.size, args.size)
    video = torch.rand(1, cfg.in_channels, args.frames, args.size, args.size,
                       generator=torch.Generator().manual_seed(0))
    print(f"{info['cpu']}, {info['cpu_cores']} cores, {info['torch_threads']} threads, ISA {info['isa']}, "
          f"load {info['load_avg_1m']:.1f}; {args.preset}, clip {args.frames}x{args.size}x{args.size}: "
          f"encode {flops['encode'] / 1e12:.2f} TFLOP, decode {flops['decode'] / 1e12:.2f} TFLOP", flush=True)
    result = header(args, info, model, flops, use_bf16)
    samples = []
    for r in range(args.repeats):
        print(f"round {r + 1}/{args.repeats}", flush=True)
        for variant in variants:   # the file is rewritten after each, so a cut-short run keeps its rows
            samples += one_round(model, video, [variant], args)
            result.update(rows=summarize(samples, flops), load_avg_1m_after=os.getloadavg()[0],
                          complete=(r + 1 == args.repeats and variant == variants[-1]))
            atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    report(result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
