"""``nbp generate --frames N [--window W] [--stream]``: videos past the trained length.

``nbp generate`` hands a request here when ``--frames`` is given: frame prediction
(``--input`` / ``--predict``) or a whole video (``--class-id``) of N = 1 + f_t k
frames through ``nbp.long_video`` (a rolling latent window of ``--window`` latent
frames). ``--stream`` writes an MP4 that grows as the frames are decoded, with a
frame counter on stderr (``nbp.long_video.write_mp4_stream``).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import torch

__all__ = ["add_arguments", "check_args", "run", "write_stream"]


def add_arguments(p) -> None:
    """The long-video flags of ``nbp generate``."""
    p.add_argument("--frames", type=int, default=None,
                   help="length of the video: 1 + f_t k frames (f_t: the tokenizer's time factor, "
                        "2 for the demo, 4 for K600), past the trained length with a rolling "
                        "latent window (default: the model's trained length)")
    p.add_argument("--window", type=int, default=None,
                   help="with --frames: latent frames of context per window (default: the trained "
                        "length minus one block-row)")
    p.add_argument("--stream", action="store_true",
                   help="with --frames: write the .mp4 --out as frames are generated (it grows; a "
                        "frame counter goes to stderr)")


def check_args(args) -> None:
    """Refuse flag combinations that cannot work, before any model is loaded."""
    if args.frames is None:
        for flag, value in (("--window", args.window), ("--stream", args.stream)):
            if value not in (None, False):
                raise ValueError(f"{flag}: needs --frames N (a long video)")
    if args.stream and Path(args.out).suffix.lower() != ".mp4":
        raise ValueError(f"--stream: writes an MP4 as it grows; expected an .mp4 --out, got "
                         f"{args.out!r}")
    for flag, used in (("--side-by-side", args.side_by_side), ("--mark-given", args.mark_given)):
        if used and args.stream:
            raise ValueError(f"{flag}: composes the finished video; not with --stream")


def run(args, gen, *, video: torch.Tensor | None = None, num_cond_frames: int = 5,
        sampling: dict, **request):
    """Generate ``args.frames`` frames with ``gen`` (a FastGenerator with a tokenizer).

    video: float [B, 3, T, H, W] in [0, 1] to continue from its first
    ``num_cond_frames`` frames, or None for a whole video. ``request``: class_ids,
    cond_ids, batch_size, mode (``FastGenerator.stream_frames``); ``sampling``: the
    sampling arguments (a ``callback`` is dropped: frames stream instead). Returns
    the video float32 [B, 3, N, H, W], or with ``--stream`` the iterator of its
    frames for ``write_stream`` (nothing is generated until it is read).
    """
    sampling = {k: v for k, v in sampling.items() if k != "callback"}
    frames = gen.stream_frames(video, num_cond_frames, num_frames=args.frames,
                               window=args.window, **request, **sampling)
    return frames if args.stream else torch.cat(list(frames), dim=2)


def write_stream(args, frames: Iterable[torch.Tensor], fps: float) -> int:
    """Write ``run``'s frames to ``args.out`` as they come (an MP4 that grows, a frame
    counter on stderr), enlarged ``args.scale`` times; returns the frame count."""
    from nbp.long_video import write_mp4_stream

    return write_mp4_stream(frames, args.out, fps=fps, scale=args.scale, total=args.frames,
                            counter=sys.stderr)
