"""NTP vs NBP (and the published-style baseline), like the paper's Table 1.

K600 frame prediction shape: 2 given latent frames (512 tokens), 3 generated
(768 tokens, 12 video frames), random weights. Methods, timed round-robin in
one process (medians):

* ``nbp``: FastGenerator, L tokens per step;
* ``ntp``: FastGenerator, the same model with mode="ntp" (one token per step);
* ``baseline-nbp`` / ``baseline-ntp``: benchmarks/ablations/baseline.py.

frames/s is given without and (with --tokenizer) with the tokenizer's encode
of the 5 given frames and decode of all 17. Writes a table and JSON to
benchmarks/results/ntp_vs_nbp_<preset>_<machine>.json.

``--torch-linear`` adds both modes with ``FastGenerator(packed_linear=False)``
(torch/MKL linears) to the same interleaved run.

CPU acceptance run (issue 4):
    python benchmarks/ablations/ntp_vs_nbp.py --layers 6 --width 384 --baseline --torch-linear \
        --threads 2 --repeats 5
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from baseline import generate_tokens as baseline_generate
from ablation_args import add_ablation_args, write_result
from nbp.commands.bench import (bench_config, format_table, machine_info, machine_tag, median, ntp_vs_nbp,
                                random_model, time_interleaved)
from nbp_kernels import packed_linear, sample_cpu

RESULTS = Path(__file__).resolve().parents[1] / "results"


def tokenizer_seconds(preset: str, device, repeats: int, latent_shape) -> float:
    """Median seconds to encode 5 frames and decode the whole clip (random weights, batch 1)."""
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer

    cfg = TokenizerConfig.from_preset(preset)
    tok = VideoTokenizer(cfg).to(device).eval()
    T, H, W = cfg.video_shape(*latent_shape)
    video = torch.rand(1, 3, T, H, W, device=device)
    codes = torch.randint(0, cfg.codebook_size, (1, *latent_shape), device=device)

    def job():
        tok.encode(video[:, :, :1 + cfg.factors[0]])
        tok.decode(codes)
    return median(time_interleaved({"tok": job}, repeats, device)["tok"])


def torch_linear_methods(model, sampling: dict) -> dict:
    """"nbp-torch-linear" / "ntp-torch-linear": FastGenerator with packed_linear=False."""
    from nbp.generate import FastGenerator

    gen = FastGenerator(model, packed_linear=False)

    def method(mode):
        return lambda ids, n: gen.generate_tokens(ids, n, mode=mode, generator=torch.Generator(
            gen.device).manual_seed(0), **sampling)
    return {f"{m}-torch-linear": method(m) for m in ("nbp", "ntp")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_ablation_args(p)
    p.add_argument("--baseline", action="store_true", help="also time the published-style baseline (nbp)")
    p.add_argument("--baseline-ntp", action="store_true", help="also time the baseline in ntp mode (slow)")
    p.add_argument("--torch-linear", action="store_true",
                   help="also time both modes with packed_linear=False (torch/MKL linears)")
    p.add_argument("--tokenizer", default=None, help="tokenizer preset to time (e.g. magvit2, tiny)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    return p.parse_args(argv)


def ratios_of(rows: list[dict]) -> dict:
    """Wall and process-CPU time ratios: NTP / NBP and baseline / fast NBP."""
    ratios = {}
    for kind, key in (("", "seconds"), ("cpu_", "cpu_seconds")):
        sec = {r["method"]: r[key] for r in rows}
        ratios[kind + "ntp_over_nbp"] = sec["ntp"] / sec["nbp"]
        if "nbp-torch-linear" in sec:
            ratios[kind + "ntp_over_nbp_torch_linear"] = sec["ntp-torch-linear"] / sec["nbp-torch-linear"]
        for other in ("baseline-nbp", "baseline-ntp"):
            if other in sec:
                ratios[f"{kind}{other.replace('-', '_')}_over_fast_nbp"] = sec[other] / sec["nbp"]
    return ratios


def report(args, cfg, rows: list[dict], info: dict, tok_s, ratios: dict) -> None:
    print(f"{args.preset}: {cfg.n_layer} layers x {cfg.n_embd} ({cfg.n_head} heads), vocab "
          f"{cfg.vocab_size}, L={cfg.block_size}, batch {args.batch}, {args.dtype}, top-k "
          f"{args.top_k}, top-p {args.top_p}, random weights")
    print(f"machine: {info.get('gpu') or info['cpu']}, {info['cpu_cores']} cores, "
          f"{info['torch_threads']} torch threads, load {info['load_avg_1m_before']} -> "
          f"{info['load_avg_1m']}")
    print(format_table(rows))
    print("process CPU seconds (median): " + ", ".join(f"{r['method']} {r['cpu_seconds']:.3f}"
                                                      for r in rows))
    if tok_s is not None:
        print(f"tokenizer ({args.tokenizer}, encode 5 + decode all frames): {tok_s:.3f} s; "
              + ", ".join(f"{r['method']} {r['frames_per_s_with_tokenizer']:.2f} frames/s"
                          for r in rows))
    print("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = bench_config(args.preset, layers=args.layers, width=args.width, vocab=args.vocab)
    model = random_model(cfg, device=device, dtype=dtype)
    sampling = dict(top_k=args.top_k if args.top_k > 0 else None, top_p=args.top_p)
    extra = {f"baseline-{mode}": (lambda m: lambda ids, n: baseline_generate(
        model, ids, n, mode=m, **sampling))(mode)
        for mode, on in (("nbp", args.baseline), ("ntp", args.baseline_ntp)) if on}
    if args.torch_linear:
        extra.update(torch_linear_methods(model, sampling))
    load_before = machine_info(device)["load_avg_1m"]
    rows = ntp_vs_nbp(model, batch=args.batch, repeats=args.repeats, device=device,
                      extra=extra, **sampling)
    info = dict(machine_info(device), load_avg_1m_before=load_before,
                **{name: True if ok else f"no ({why})"        # as `nbp info` reports them
                   for name, (ok, why) in (("packed_linear", packed_linear.is_available()),
                                           ("sample_cpu", sample_cpu.is_available()))})
    tok_s = None
    if args.tokenizer:
        tok_s = tokenizer_seconds(args.tokenizer, device, args.repeats, cfg.latent_shape)
        for r in rows:
            r["frames_per_s_with_tokenizer"] = r["frames_per_s"] * r["seconds"] / (r["seconds"] + tok_s)
    ratios = ratios_of(rows)
    report(args, cfg, rows, info, tok_s, ratios)
    result = {"preset": args.preset, "config": cfg.to_dict(), "batch": args.batch,
              "dtype": args.dtype, "sampling": sampling, "machine": info, "rows": rows,
              "tokenizer": {"preset": args.tokenizer, "seconds": tok_s}, "ratios": ratios}
    out = Path(args.out) if args.out else RESULTS / (
        f"ntp_vs_nbp_{args.preset}_{cfg.n_layer}x{cfg.n_embd}_{args.dtype}_"
        f"{info['torch_threads']}t_{machine_tag(info)}.json")
    write_result(out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
