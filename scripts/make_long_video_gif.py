"""Render docs/nbp-long-video.gif: 65-frame predictions of the shipped demo models (README).

Usage: python scripts/make_long_video_gif.py [OUT] [--frames 65] [--scale 3] [--no-reencode]

Top row: four held-out clips (seed nbp.demo.EVAL_SEED) rendered at 65 frames, the ground
truth. Bottom row: greedy NBP prediction from their first 5 frames to 65 frames, almost
four times the 17 frames of a window (``nbp.long_video``, default window, each window's
context re-encoded unless --no-reencode), by ``nbp_long`` (the NBP model fine-tuned on
windows of 65-frame clips; ``DemoModels.long_model``, ``nbp`` where it is missing).
Frames are upscaled with nearest-neighbour so the 16x16 clips are visible.
"""
from __future__ import annotations

import argparse
import time

import torch

from nbp.data.synthetic import render_clip
from nbp.demo import DATA_OPTIONS, EVAL_SEED, NUM_COND_FRAMES, load_demo
from nbp.generate import FastGenerator
from nbp.io import save_video, video_grid
from nbp.long_video import predict_frames


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="docs/nbp-long-video.gif")
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--scale", type=int, default=3)
    p.add_argument("--no-reencode", dest="reencode", action="store_false")
    args = p.parse_args()
    torch.set_num_threads(1)
    demo = load_demo()
    name, model = demo.long_model()
    gen = FastGenerator(model, demo.tokenizer, device="cpu")
    clips = [render_clip(EVAL_SEED, i, **{**DATA_OPTIONS, "num_frames": args.frames})
             for i in range(4)]
    video = torch.stack([torch.from_numpy(c[0]) for c in clips])
    labels = torch.tensor([c[1] for c in clips])
    t0 = time.perf_counter()
    pred = predict_frames(gen, video, NUM_COND_FRAMES, num_frames=args.frames, class_ids=labels,
                          reencode=args.reencode, do_sample=False)
    seconds = time.perf_counter() - t0
    grid = video_grid([video, pred], args.scale)
    save_video(grid, args.out, fps=8)
    print(f"wrote {args.out} ({tuple(grid.shape)}; {name}, generation {seconds:.2f} s on CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
