"""Generation speed against the block size L (the paper's Figure 7).

For each L in 1, 2, 4, ..., 256 a random-weight model whose block shape has
L tokens (rows of the 16x16 latent frame, then several rows: 1x1xL up to
1x16x16) generates the 768 tokens of K600 frame prediction after the 512
given ones with FastGenerator. Reports steps, seconds and frames/s (12 video
frames per sample) and writes JSON + a PNG plot (drawn with Pillow) to
benchmarks/results/block_size_sweep_<machine>.{json,png}.

    python benchmarks/ablations/block_size_sweep.py --layers 6 --width 384 --threads 1
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ablation_args import add_ablation_args
from nbp.commands.bench import (bench_config, frame_prediction_shape, machine_info, machine_tag, median,
                                random_model, time_interleaved)
from nbp.generate import FastGenerator
from nbp.io import atomic_path, atomic_write_text

RESULTS = Path(__file__).resolve().parents[1] / "results"
FRAMES_PER_SAMPLE = 12   # 3 generated latent frames x 4 video frames each


def block_shape_for(L: int, latent_shape) -> tuple[int, int, int]:
    """(1, bh, bw) with bh * bw = L: part of a row, or whole rows of the latent frame."""
    _, h, w = latent_shape
    if L <= w and w % L == 0:
        return 1, 1, L
    if L % w == 0 and h % (L // w) == 0:
        return 1, L // w, w
    raise ValueError(f"L={L} does not tile a {h}x{w} latent frame in rows")


def sweep(args, device, dtype) -> list[dict]:
    rows = []
    for L in args.block_sizes:
        base = bench_config(args.preset, layers=args.layers, width=args.width, vocab=args.vocab)
        cfg = bench_config(args.preset, layers=args.layers, width=args.width, vocab=args.vocab,
                           block_shape=block_shape_for(L, base.latent_shape))
        gen = FastGenerator(random_model(cfg, device=device, dtype=dtype), device=device)
        given, new = frame_prediction_shape(cfg)
        ids = torch.randint(0, cfg.codebook_size, (args.batch, given),
                            generator=torch.Generator().manual_seed(0))
        run = lambda: gen.generate_tokens(ids, new, top_k=args.top_k, top_p=args.top_p,  # noqa: E731
                                          generator=torch.Generator(gen.device).manual_seed(0))
        ts = time_interleaved({"run": run}, args.repeats, device)["run"]
        sec = median(ts)
        row = {"L": L, "block_shape": list(cfg.block_shape), "steps": new // L, "seconds": sec,
               "times": ts, "frames_per_s": args.batch * FRAMES_PER_SAMPLE / sec}
        print(f"L={L:>4} {str(tuple(cfg.block_shape)):<13} steps {row['steps']:>4}  "
              f"{sec:8.3f} s  {row['frames_per_s']:8.2f} frames/s", flush=True)
        rows.append(row)
    return rows


def plot(rows: list[dict], title: str, path: Path, size=(720, 480)) -> None:
    """Frames/s against L (log2 axis) as a PNG, like the paper's Figure 7."""
    W, H = size
    left, right, top, bottom = 80, 70, 50, 60
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [math.log2(r["L"]) for r in rows]
    ys = [r["frames_per_s"] for r in rows]
    x_max, y_max = max(max(xs), 1.0), max(ys) * 1.1

    def px(x, y):
        return (left + (W - left - right) * x / x_max, H - bottom - (H - top - bottom) * y / y_max)
    d.line([px(0, 0), px(x_max, 0)], fill="black", width=2)
    d.line([px(0, 0), px(0, y_max)], fill="black", width=2)
    for r, x in zip(rows, xs):
        gx, gy = px(x, 0)
        d.line([(gx, gy), (gx, gy + 5)], fill="black")
        d.text((gx - 8, gy + 8), str(r["L"]), fill="black")
    for i in range(6):
        y = y_max * i / 5
        gx, gy = px(0, y)
        d.line([(gx - 5, gy), (gx, gy)], fill="black")
        d.text((8, gy - 6), f"{y:.3g}", fill="black")
    pts = [px(x, y) for x, y in zip(xs, ys)]
    d.line(pts, fill=(30, 90, 200), width=3)
    for (x, y), r in zip(pts, rows):
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(200, 40, 40))
        d.text((x + 6, y - 16), f"{r['frames_per_s']:.2f}", fill=(200, 40, 40))
    d.text((left, 15), title, fill="black")
    d.text((W // 2 - 70, H - 25), "block size L (tokens per step)", fill="black")
    d.text((8, top - 30), "frames/s", fill="black")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_ablation_args(p)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    load_before = machine_info(device)["load_avg_1m"]
    rows = sweep(args, device, dtype)
    info = dict(machine_info(device), load_avg_1m_before=load_before)
    cfg = bench_config(args.preset, layers=args.layers, width=args.width, vocab=args.vocab)
    name = f"{cfg.n_layer}x{cfg.n_embd}"
    title = (f"{args.preset} {name} vocab {cfg.vocab_size}, {args.dtype}, batch {args.batch}, "
             f"{info.get('gpu') or info['cpu']} ({info['torch_threads']} threads)")
    stem = RESULTS / f"block_size_sweep_{args.preset}_{name}_{machine_tag(info)}"
    plot(rows, title, stem.with_suffix(".png"))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(
        {"preset": args.preset, "config": cfg.to_dict(), "dtype": args.dtype, "batch": args.batch,
         "sampling": {"top_k": args.top_k, "top_p": args.top_p}, "machine": info, "rows": rows},
        indent=2) + "\n")
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
