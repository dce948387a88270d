"""``nbp bench``: NTP vs NBP generation speed of a preset on this device (random weights).

Its pieces are also imported by ``benchmarks/``: the machine's name,
random-weight models of a preset with size overrides, and interleaved
side-by-side timing. Helpers only the benchmark scripts use live there
(``benchmarks/harness.py``, ``benchmarks/ablations/ablation_args.py``).
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from nbp_kernels import cpu_build, prefill_gemm

from .cpu_options import (
    act_dtype,
    add_act_dtype,
    add_threads,
    add_weight_dtype,
    apply_threads,
    weight_dtype,
)

# CPU default: the preset's layout at 6 layers x 384 wide, so NTP finishes in about a minute.
CPU_LAYERS, CPU_WIDTH = 6, 384


def cpu_identity() -> dict:
    """The first CPU's ``model name``, ``cpu family`` and ``model`` from /proc/cpuinfo
    (keys cpu, cpu_family, cpu_model; the last two absent where it lacks them)."""
    fields = {"model name": "cpu", "cpu family": "cpu_family", "model": "cpu_model"}
    out = {"cpu": platform.processor() or "unknown cpu"}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key, _, value = ln.partition(":")
                name = fields.get(key.strip())
                if not ln.strip():
                    break   # the first processor's block only
                if name:
                    out[name] = value.strip()
    except OSError:
        pass
    return out


# environment variables that hold a library's (or nbp's) CPU kernels to a narrower ISA: a
# run with them set stands for a CPU without the wider one (benchmarks/ablations/*.py)
ISA_CAP_ENVS = (cpu_build.ENV, *prefill_gemm.ISA_CAPS, "MKL_ENABLE_INSTRUCTIONS",
                "ATEN_CPU_CAPABILITY")


def machine_info(device: torch.device | str = "cpu") -> dict:
    """CPU model (with its family and model numbers) and cores (from /proc/cpuinfo), load,
    torch threads, ATen's CPU capability and the ISA caps set in the environment
    (``ISA_CAP_ENVS``), and the GPU's name."""
    device = torch.device(device)
    info = {**cpu_identity(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": str(device),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_caps": {k: os.environ[k] for k in ISA_CAP_ENVS if os.environ.get(k)}}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_tag(info: dict) -> str:
    """A file-name-safe name of the machine a result was measured on. A CPU name without a
    model number (a VM's "AMD EPYC", "Intel(R) Xeon(R) Processor") gets its family and
    model (``f26m2``: a Zen 5 EPYC), so two generations behind one name stay apart."""
    cpu = info.get("cpu", "unknown cpu")
    if not any(c.isdigit() for c in cpu) and "cpu_family" in info and "cpu_model" in info:
        cpu = f"{cpu} f{info['cpu_family']}m{info['cpu_model']}"
    name = info.get("gpu") or f"{cpu} {info['cpu_cores']}c"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def bench_config(preset: str, *, layers: int | None = None, width: int | None = None,
                 heads: int | None = None, vocab: int | None = None, block_shape=None):
    """The preset's TransformerConfig with size overrides (heads default: width / 64)."""
    from nbp.config import TransformerConfig

    over = {}
    if layers is not None:
        over["n_layer"] = layers
    if width is not None:
        over["n_embd"] = width
        over["n_head"] = heads or max(1, width // 64)
    elif heads is not None:
        over["n_head"] = heads
    if vocab is not None:
        over.update(vocab_size=vocab, codebook_size=vocab)
    if block_shape is not None:
        over["block_shape"] = tuple(block_shape)
    return TransformerConfig.from_preset(preset, **over)


def random_model(config, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """An NBPTransformer with seeded random weights, in eval mode on ``device``."""
    from nbp.model import NBPTransformer

    torch.manual_seed(seed)
    return NBPTransformer(config).to(device=device, dtype=dtype).eval()


def frame_prediction_shape(config, given_latent_frames: int = 2) -> tuple[int, int]:
    """(given tokens, new tokens) of K600-style prediction on the config's latent grid."""
    t, h, w = config.latent_shape
    return given_latent_frames * h * w, (t - given_latent_frames) * h * w


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, repeats: int, device: torch.device | str = "cpu",
                     warmup: int = 1, cpu_times: dict | None = None) -> dict[str, list[float]]:
    """Wall seconds per call of each function, measured round-robin so load changes hit
    all alike. ``cpu_times``, if given, receives this process's CPU seconds per call
    (less sensitive to other processes on a shared machine)."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - c0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def ntp_vs_nbp(model, *, batch: int = 1, repeats: int = 3, top_k: int | None = 16000,
               top_p: float | None = 0.9, device="cpu", seed: int = 0, extra: dict | None = None,
               graphs="auto", weight_dtype=None, act_dtype=None) -> list[dict]:
    """Median time of K600-style generation in modes "nbp" and "ntp" (plus ``extra``
    callables taking (input_ids, num_new, mode)); one row per method. weight_dtype,
    act_dtype: ``FastGenerator``'s (None: the model's float32 weights, float32
    activations)."""
    from nbp.generate import FastGenerator

    device = torch.device(device)
    cfg = model.config
    given, new = frame_prediction_shape(cfg)
    gen = FastGenerator(model, device=device, cuda_graphs=graphs, weight_dtype=weight_dtype,
                        act_dtype=act_dtype)
    ids = torch.randint(cfg.video_offset, cfg.video_offset + cfg.codebook_size, (batch, given),
                        generator=torch.Generator().manual_seed(seed))

    def run(mode):
        return lambda: gen.generate_tokens(ids, new, mode=mode, top_k=top_k, top_p=top_p,
                                           generator=torch.Generator(gen.device).manual_seed(seed))

    fns = {"nbp": run("nbp"), "ntp": run("ntp")}
    for name, fn in (extra or {}).items():
        fns[name] = (lambda f: lambda: f(ids, new))(fn)
    cpu: dict[str, list[float]] = {}
    times = time_interleaved(fns, repeats, device, cpu_times=cpu)
    L = cfg.block_size
    steps = {"nbp": new // L, "ntp": new}
    rows = []
    for name, ts in times.items():
        sec = median(ts)
        n_steps = steps.get(name, steps["nbp"] if "nbp" in name else steps["ntp"])
        rows.append({"method": name, "steps": n_steps, "seconds": sec, "times": ts,
                     "cpu_seconds": median(cpu[name]), "cpu_times": cpu[name],
                     "tokens_per_s": batch * new / sec,
                     "frames_per_s": batch * _new_frames(cfg) / sec})
    return rows


def _new_frames(cfg, time_factor: int = 4) -> int:
    """Video frames generated: the new latent frames times the tokenizer's time factor."""
    return (cfg.latent_shape[0] - 2) * time_factor


def format_table(rows: list[dict], ref: str = "nbp") -> str:
    base = {r["method"]: r["seconds"] for r in rows}
    head = f"{'method':<16}{'steps':>7}{'time s':>10}{'tokens/s':>11}{'frames/s':>10}{'vs ' + ref:>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<16}{r['steps']:>7}{r['seconds']:>10.3f}{r['tokens_per_s']:>11.1f}"
                     f"{r['frames_per_s']:>10.2f}{r['seconds'] / base[ref]:>8.2f}x")
    return "\n".join(lines)


def run(args) -> int:
    apply_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    layers, width = args.layers, args.width
    if device.type == "cpu" and layers is None and width is None:
        layers, width = CPU_LAYERS, CPU_WIDTH
        print(f"CPU: {args.preset} layout at {layers} layers x {width} wide "
              f"(--layers/--width to change)")
    cfg = bench_config(args.preset, layers=layers, width=width)
    model = random_model(cfg, device=device, dtype=dtype, seed=args.seed)
    if args.top_k < 0:
        raise ValueError(f"--top-k: expected 0 (no top-k) or a positive int, got {args.top_k}")
    top_k = None if args.top_k == 0 else args.top_k
    rows = ntp_vs_nbp(model, batch=args.batch, repeats=args.repeats, top_k=top_k, top_p=args.top_p,
                      device=device, seed=args.seed, weight_dtype=weight_dtype(args.weight_dtype),
                      act_dtype=act_dtype(args.act_dtype))
    info = machine_info(device)
    print(f"{args.preset}: {cfg.n_layer} layers, width {cfg.n_embd}, vocab {cfg.vocab_size}, "
          f"L={cfg.block_size}, batch {args.batch}, {dtype}, random weights stored "
          f"{args.weight_dtype}, activations {args.act_dtype}")
    print(f"device: {info.get('gpu') or info['cpu']} ({info['cpu_cores']} cores, "
          f"{info['torch_threads']} torch threads, load {info['load_avg_1m']})")
    print(format_table(rows))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="NTP vs NBP generation speed on this device (random weights)")
    p.add_argument("--preset", default="k600-base", help="transformer preset (default k600-base)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--width", type=int, default=None, help="override the width (heads = width/64)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--top-k", type=int, default=16000, help="0 disables top-k")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    add_weight_dtype(p)
    add_act_dtype(p)
    add_threads(p)
    p.set_defaults(func=run)
