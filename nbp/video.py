"""Reading video files with PyAV: probe a file, read a short clip at a model's rate and size.

``probe(path)`` opens the file, checks that it has a decodable video stream
and returns its :class:`VideoInfo`; a missing, empty, truncated or non-video
file raises :class:`VideoError` (a ``ValueError``) with a one-line message.

``read_clip(path, start_seconds=..., num_frames=..., fps=..., size=...)``
seeks to the start, decodes only up to the last frame it needs, keeps for each
wanted time ``start + k / fps`` the decoded frame nearest to it (resampling the
file's frame rate to the model's), and scales every kept frame while converting
it to RGB (swscale, area filter), so memory holds the kept frames at the
model's size plus the decoder's few working frames, whatever the file's
length or resolution. The short side is scaled to the target and the centre
cropped, as ``nbp.data.video_folder`` does for training.

``mark_given`` and ``side_by_side`` compose the videos ``nbp generate`` writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["VideoError", "VideoInfo", "probe", "read_clip", "frames_available", "mark_given",
           "side_by_side"]

# A wanted time may lie this far past the last frame's timestamp and still be that frame
# (it is shown for one frame period); the small slack absorbs rounding of timestamps.
_EPS = 1e-6


class VideoError(ValueError):
    """A video file that cannot be read, or has too little video for the request."""


@dataclass(frozen=True)
class VideoInfo:
    """What a file's first video stream holds: frames (count, from the header or
    duration x fps), fps (average frame rate), width/height (pixels) and
    duration (seconds, from the first frame's start to the end of the last)."""

    path: str
    frames: int
    fps: float
    width: int
    height: int
    duration: float


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _open(path: str | Path):
    """An open av container for ``path``; VideoError for anything that is not a media file."""
    import av

    p = Path(path)
    if not p.exists():
        raise VideoError(f"{str(p)!r}: no such file")
    if not p.is_file():
        raise VideoError(f"{str(p)!r}: not a file")
    if p.stat().st_size == 0:
        raise VideoError(f"{str(p)!r}: the file is empty (0 bytes)")
    try:
        return av.open(str(p), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"{str(p)!r}: not a readable video file ({_reason(e)})") from None


def _stream(container, path):
    if not container.streams.video:
        raise VideoError(f"{str(path)!r}: has no video stream")
    return container.streams.video[0]


def _origin(stream) -> float:
    """Timestamp (s) of the stream's first frame: frame times are measured from it."""
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def probe(path: str | Path) -> VideoInfo:
    """Open ``path``, decode its first video frame and describe the stream (see VideoInfo).

    Raises VideoError for a missing or empty file, a file no demuxer recognises
    (a text file named .mp4, a truncated mp4 without its index), a file without
    a video stream, or one whose first frame does not decode.
    """
    import av

    with _open(path) as container:
        stream = _stream(container, path)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise VideoError(f"{str(path)!r}: the video stream has no frame rate")
        fps = float(rate)
        if stream.duration is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = (stream.frames or 0) / fps
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise VideoError(f"{str(path)!r}: the first frame does not decode ({_reason(e)})") from None
        if first is None:
            raise VideoError(f"{str(path)!r}: the video stream holds no frames (truncated?)")
        frames = stream.frames or max(1, round(duration * fps))
        if duration <= 0:
            duration = frames / fps
        return VideoInfo(str(path), int(frames), fps, first.width, first.height, duration)


def frames_available(info: VideoInfo, start_seconds: float, fps: float) -> int:
    """How many frames at ``fps`` the file holds from ``start_seconds`` (0 past its end)."""
    span = info.duration - start_seconds
    return max(0, math.floor(span * fps - _EPS) + 1) if span > 0 else 0


def _target_size(size) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size: expected a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


class _Scaler:
    """VideoFrame -> uint8 [H, W, 3]: short side scaled to the target, centre cropped."""

    def __init__(self, width: int, height: int, out_h: int, out_w: int):
        s = max(out_h / height, out_w / width)
        self.sw, self.sh = max(out_w, round(width * s)), max(out_h, round(height * s))
        self.top, self.left = (self.sh - out_h) // 2, (self.sw - out_w) // 2
        self.out_h, self.out_w = out_h, out_w

    def __call__(self, frame) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24", width=self.sw, height=self.sh, interpolation="AREA")
        return rgb[self.top:self.top + self.out_h, self.left:self.left + self.out_w]


def _check_request(start_seconds, num_frames, fps) -> None:
    if not isinstance(start_seconds, (int, float)) or isinstance(start_seconds, bool) \
            or not 0 <= start_seconds < math.inf:
        raise ValueError(f"start_seconds: expected a number >= 0, got {start_seconds!r}")
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
    if fps is not None and (not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
        raise ValueError(f"fps: expected a positive number or None, got {fps!r}")


def read_clip(path: str | Path, *, start_seconds: float = 0.0, num_frames: int,
              fps: float | None = None, size) -> torch.Tensor:
    """``num_frames`` frames at ``fps`` (None: the file's own rate) from ``start_seconds``.

    size: int (square) or (height, width). Frame k is the decoded frame nearest
    to time ``start_seconds + k / fps`` (seconds from the stream's first frame).
    Returns float32 [3, num_frames, height, width] in [0, 1]. Raises VideoError
    when the file is unreadable or ends before the last wanted time.
    """
    import av

    _check_request(start_seconds, num_frames, fps)
    out_h, out_w = _target_size(size)
    info = probe(path)
    fps = float(fps) if fps is not None else info.fps
    have = frames_available(info, start_seconds, fps)
    if have < num_frames:
        raise VideoError(f"{str(path)!r}: {info.duration:.2f} s long; from {start_seconds:g} s it "
                         f"holds {have} frames at {fps:g} fps, {num_frames} wanted")
    targets = start_seconds + np.arange(num_frames) / fps
    scale = _Scaler(info.width, info.height, out_h, out_w)
    with _open(path) as container:
        stream = _stream(container, path)
        origin = _origin(stream)
        if start_seconds > 0:  # lands on the key frame at or before the start
            container.seek(int((start_seconds + origin) / stream.time_base), stream=stream,
                           backward=True, any_frame=False)
        try:
            kept = _pick_frames(container.decode(stream), targets, origin, scale, 1.0 / info.fps)
        except av.FFmpegError as e:
            raise VideoError(f"{str(path)!r}: damaged or truncated ({_reason(e)})") from None
    if len(kept) < num_frames:
        raise VideoError(f"{str(path)!r}: the video data ends before {targets[len(kept)]:.2f} s, "
                         f"earlier than its header says ({info.duration:.2f} s): truncated?")
    video = torch.from_numpy(np.stack(kept))                  # [T, H, W, 3] uint8
    return video.permute(3, 0, 1, 2).float().div_(255.0)


def _pick_frames(frames, targets: np.ndarray, origin: float, scale: _Scaler,
                 period: float) -> list[np.ndarray]:
    """For each target time the nearest decoded frame, scaled; stops after the last target.

    Holds at most two decoded frames (the one before a target and the one after).
    """
    kept: list[np.ndarray] = []
    prev = prev_t = prev_rgb = None
    k, n = 0, len(targets)
    for frame in frames:
        t = float(frame.time) - origin if frame.time is not None else (prev_t or 0.0) + period
        rgb = None
        while k < n and t >= targets[k] - _EPS:
            if prev is None or t - targets[k] <= targets[k] - prev_t:
                rgb = scale(frame) if rgb is None else rgb
                kept.append(rgb)
            else:
                prev_rgb = scale(prev) if prev_rgb is None else prev_rgb
                kept.append(prev_rgb)
            k += 1
        if k == n:
            return kept
        prev, prev_t, prev_rgb = frame, t, rgb
    # past the last frame: it is shown for one period, so nearby targets still get it
    while prev is not None and k < n and targets[k] < prev_t + period - _EPS:
        prev_rgb = scale(prev) if prev_rgb is None else prev_rgb
        kept.append(prev_rgb)
        k += 1
    return kept


def mark_given(video: torch.Tensor, num_given: int, width: int | None = None,
               color=(1.0, 0.15, 0.15)) -> torch.Tensor:
    """A copy of ``video`` float [..., 3, T, H, W] with a border on frames [0, num_given).

    width: border in pixels (default: 1 per 32 pixels of the short side, at least 1).
    """
    if video.dim() < 4 or video.shape[-4] != 3:
        raise ValueError(f"video: expected [..., 3, T, H, W], got shape {tuple(video.shape)}")
    H, W = video.shape[-2:]
    width = width if width is not None else max(1, min(H, W) // 32)
    out = video.clone()
    c = torch.tensor(color, dtype=out.dtype).view(3, 1, 1, 1)
    g = out[..., :num_given, :, :]
    for region in (g[..., :width, :], g[..., H - width:, :], g[..., :, :width], g[..., :, W - width:]):
        region.copy_(c.expand_as(region))
    return out


def side_by_side(*videos: torch.Tensor) -> torch.Tensor:
    """Videos float [..., 3, T_i, H, W] side by side: [..., 3, max T_i, H, sum W].

    A shorter video holds its last frame until the longest one ends.
    """
    T = max(v.shape[-3] for v in videos)
    padded = [torch.cat([v, v[..., -1:, :, :].expand(*v.shape[:-3], T - v.shape[-3], *v.shape[-2:])],
                        dim=-3) if v.shape[-3] < T else v for v in videos]
    return torch.cat(padded, dim=-1)
