"""Per-frame time and peak memory of long-video frame prediction against the video's length.

The shipped demo NBP model (trained on 17 frames = 9 latent frames) continues 5
given frames of a held-out clip to 17, 33, 65 and 129 frames with the rolling
latent window of ``nbp.long_video`` (default window, greedy), streaming the
frames (``stream_frames``) and dropping them as they come. Each length runs in
a fresh process so that its peak resident memory (``ru_maxrss``) is its own.
Reports, per length: seconds per output frame after the first window (the
window is full from then on), seconds per frame of every latent frame as it
was yielded, the peak resident memory above the loaded models, and the KV
cache's size. Writes JSON + a PNG plot (drawn with Pillow) to
benchmarks/results/long_video_<machine>.{json,png}.

    python benchmarks/ablations/long_video.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from nbp.commands.bench import machine_info, machine_tag, median
from nbp.io import atomic_path, atomic_write_text

RESULTS = Path(__file__).resolve().parents[1] / "results"
COLOURS = [(30, 90, 200), (200, 40, 40), (40, 150, 60), (150, 60, 170)]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def measure(num_frames: int, threads: int, repeats: int, batch: int) -> dict:
    """One length, in this process: per-latent-frame seconds (best of ``repeats``) and memory."""
    from nbp.data.synthetic import render_clip
    from nbp.demo import DATA_OPTIONS, EVAL_SEED, NUM_COND_FRAMES, load_demo
    from nbp.generate import FastGenerator
    from nbp.long_video import stream_frames

    torch.set_num_threads(threads)
    demo = load_demo()
    gen = FastGenerator(demo.nbp, demo.tokenizer, device="cpu")
    clips = [render_clip(EVAL_SEED, i, **{**DATA_OPTIONS, "num_frames": NUM_COND_FRAMES})
             for i in range(batch)]
    video = torch.stack([torch.from_numpy(c[0]) for c in clips])
    labels = torch.tensor([c[1] for c in clips])
    base = _peak_mb()
    best = None
    for _ in range(repeats + 1):   # the first run warms up allocations
        frames, stamps = [], []
        t0 = time.perf_counter()
        for chunk in stream_frames(gen, video, NUM_COND_FRAMES, num_frames=num_frames,
                                   class_ids=labels, do_sample=False):
            now = time.perf_counter()
            frames.append(chunk.shape[2])
            stamps.append(now - t0)
            t0 = now
        per_frame = [s / f for s, f in zip(stamps, frames)]
        best = per_frame if best is None else [min(a, b) for a, b in zip(best, per_frame)]
    cache = gen.cache
    cache_mb = sum(t.numel() * t.element_size() for t in (cache.k, cache.v)) / 2**20
    given = 1 + (NUM_COND_FRAMES - 1) // demo.tokenizer.config.factors[0]
    first_window = gen.config.latent_shape[0]
    # Latent frames given, then the first window's (one generate call), then one per window.
    later = [s * f for s, f in zip(best[first_window:], frames[first_window:])]
    return {"num_frames": num_frames, "latent_frames": len(frames), "frames": frames,
            "seconds_per_frame": best, "given_latent_frames": given,
            "seconds_per_frame_after_window": (sum(later) / sum(frames[first_window:])
                                               if later else None),
            "median_seconds_per_frame_after_window": (median(best[first_window:])
                                                      if later else None),
            "peak_rss_mb_above_models": _peak_mb() - base, "peak_rss_mb": _peak_mb(),
            "cache_mb": cache_mb, "cache_positions": cache.max_len}


def run_isolated(num_frames: int, threads: int, repeats: int, batch: int) -> dict:
    """``measure`` in a fresh process (its errors are raised here)."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (num_frames, threads, repeats, batch))


def plot(rows: list[dict], title: str, path: Path, size=(960, 480)) -> None:
    """Left: seconds per frame of each latent frame as yielded, per video length; right: peak
    memory above the loaded models against the length."""
    _, H = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((20, 10), title, fill="black")
    panels = [(60, 470), (560, 930)]
    top, bottom = 50, H - 60
    longest = max(r["latent_frames"] for r in rows)
    t_max = max(max(r["seconds_per_frame"][r["given_latent_frames"]:]) for r in rows) * 1.15
    m_max = max(max(r["peak_rss_mb_above_models"] for r in rows) * 1.3, 1.0)

    def axes(x0, x1, y_max, y_label, x_label):
        d.line([(x0, bottom), (x1, bottom)], fill="black", width=2)
        d.line([(x0, bottom), (x0, top)], fill="black", width=2)
        for i in range(6):
            y = bottom - (bottom - top) * i / 5
            d.line([(x0 - 5, y), (x0, y)], fill="black")
            d.text((x0 - 55, y - 6), f"{y_max * i / 5:.3g}", fill="black")
        d.text((x0, top - 18), y_label, fill="black")
        d.text(((x0 + x1) // 2 - 60, H - 30), x_label, fill="black")

    (a0, a1), (b0, b1) = panels
    axes(a0, a1, t_max * 1e3, "ms per output frame", "latent frame index")
    for i, r in enumerate(rows):
        xs = range(r["given_latent_frames"], r["latent_frames"])
        pts = [(a0 + (a1 - a0) * x / longest,
                bottom - (bottom - top) * r["seconds_per_frame"][x] / t_max) for x in xs]
        colour = COLOURS[i % len(COLOURS)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.text((a1 - 90, top + 14 * i), f"{r['num_frames']} frames", fill=colour)
    axes(b0, b1, m_max, "peak RSS above the models (MB)", "video length (frames)")
    n_max = max(r["num_frames"] for r in rows) * 1.1
    pts = [(b0 + (b1 - b0) * r["num_frames"] / n_max,
            bottom - (bottom - top) * r["peak_rss_mb_above_models"] / m_max) for r in rows]
    d.line(pts, fill=COLOURS[0], width=3)
    for (x, y), r in zip(pts, rows):
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(200, 40, 40))
        d.text((x - 10, bottom + 8), str(r["num_frames"]), fill="black")
        d.text((x + 6, y - 16), f"{r['peak_rss_mb_above_models']:.1f}", fill=(200, 40, 40))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65, 129])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs after the warm-up (best kept)")
    p.add_argument("--batch", type=int, default=1, help="videos generated together")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info("cpu")
    rows = []
    for n in args.frames:
        row = run_isolated(n, args.threads, args.repeats, args.batch)
        after = row["seconds_per_frame_after_window"]
        print(f"{n:>4} frames: {'-' if after is None else f'{after * 1e3:7.2f}'} ms/frame after "
              f"the window, peak RSS +{row['peak_rss_mb_above_models']:.1f} MB, cache "
              f"{row['cache_mb']:.2f} MB", flush=True)
        rows.append(row)
    info["load_avg_1m_after"] = machine_info("cpu")["load_avg_1m"]
    title = (f"demo NBP long-video prediction, batch {args.batch}, greedy, {info['cpu']} "
             f"({args.threads} threads)")
    stem = RESULTS / f"long_video_{machine_tag(info)}"
    plot(rows, title, stem.with_suffix(".png"))
    atomic_write_text(stem.with_suffix(".json"), json.dumps(
        {"model": "nbp.demo (nbp)", "batch": args.batch, "threads": args.threads,
         "machine": info, "rows": rows}, indent=2) + "\n")
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
