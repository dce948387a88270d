"""Render docs/nbp-demo.gif from the shipped demo models (README figure).

Usage: python scripts/make_demo_gif.py [OUT] [--scale 4]

Top row: four held-out clips (seed nbp.demo.EVAL_SEED), the ground truth. Middle row:
greedy NBP frame prediction from their first 5 frames (frames 5..16 are predicted).
Bottom row: class-conditional NBP samples for the same four classes (top-k 5, the
demo default nbp.demo.SAMPLING). Frames are upscaled with nearest-neighbour so the
16x16 clips are visible.
"""
from __future__ import annotations

import argparse
import time

import torch

from nbp.demo import generate_class, heldout_clips, load_demo, predict_frames
from nbp.generate import FastGenerator
from nbp.io import save_video, video_grid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="docs/nbp-demo.gif")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    demo = load_demo()
    gen = FastGenerator(demo.nbp, demo.tokenizer, device="cpu")
    video, labels = heldout_clips(4)
    t0 = time.perf_counter()
    pred = predict_frames(gen, video, labels)
    sample = generate_class(gen, labels, generator=torch.Generator().manual_seed(args.seed))
    seconds = time.perf_counter() - t0
    grid = video_grid([video, pred, sample], args.scale)
    save_video(grid, args.out, fps=6)
    print(f"wrote {args.out} ({tuple(grid.shape)}; generation {seconds:.2f} s on CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
