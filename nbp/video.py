"""Reading video files with PyAV: the one place nbp opens, probes and decodes them.

``probe(path)`` opens the file, checks that it has a decodable video stream
and returns its :class:`VideoInfo`; a missing, empty, truncated or non-video
file raises :class:`VideoError` (a ``ValueError``) with a one-line message.

``read_frames(path, times, size)`` keeps for each wanted time (seconds from
the stream's first frame) the decoded frame nearest to it: it seeks to the
key frame at or before the first time (decoding from the start instead when
the seek lands past it or leaves frames without timestamps), decodes only up
to the last frame it needs and scales every kept frame while converting it to
RGB (swscale: the short side to the target, area filter when shrinking; the
centre cropped), so memory holds the kept frames at the target size plus the
decoder's few working frames, whatever the file's length or resolution. Times past the
video's end are an error (``past_end="error"``) or take its last frame
(``"repeat"``, as the training datasets want).

``read_clip(path, start_seconds=..., num_frames=..., fps=..., size=...)`` is
the user-facing read (``nbp generate --input``): ``num_frames`` frames at
``fps`` from ``start_seconds``, refused when the file holds fewer.
``nbp.data.video_folder`` reads training clips with ``read_frames``.

``mark_given`` and ``side_by_side`` compose the videos ``nbp generate`` writes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["VideoError", "VideoInfo", "frames_available", "mark_given", "probe", "read_clip",
           "read_frames", "side_by_side"]

# A wanted time may lie this far past the last frame's timestamp and still be that frame
# (it is shown for one frame period); the small slack absorbs rounding of timestamps.
_EPS = 1e-6


class VideoError(ValueError):
    """A video file that cannot be read, or has too little video for the request."""


@dataclass(frozen=True)
class VideoInfo:
    """What a file's first video stream holds: frames (count, from the header or
    duration x fps), fps (average frame rate), width/height (pixels), duration
    (seconds, from the first frame's start to the end of the last) and start
    (the first frame's timestamp, s: the times ``read_frames`` takes count from it)."""

    path: str
    frames: int
    fps: float
    width: int
    height: int
    duration: float
    start: float = 0.0


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _open(path: str | Path):
    """An open av container for ``path``; VideoError for anything that is not a media file."""
    import av

    p = Path(path)
    if not p.exists():
        raise VideoError(f"cannot read {str(p)!r}: no such file")
    if not p.is_file():
        raise VideoError(f"cannot read {str(p)!r}: not a file")
    if p.stat().st_size == 0:
        raise VideoError(f"cannot read {str(p)!r}: the file is empty (0 bytes)")
    try:
        return av.open(str(p), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoError(f"cannot read {str(p)!r}: not a readable video file ({_reason(e)})") from None


def _stream(container, path):
    if not container.streams.video:
        raise VideoError(f"cannot read {str(path)!r}: it has no video stream")
    return container.streams.video[0]


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
            raise VideoError(f"cannot read {str(path)!r}: the video stream has no frame rate")
        fps = float(rate)
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = (stream.frames or 0) / fps
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode {str(path)!r}: the first frame does not decode "
                             f"({_reason(e)})") from None
        if first is None:
            raise VideoError(f"cannot decode {str(path)!r}: the video stream holds no frames "
                             "(truncated?)")
        frames = stream.frames or max(1, round(duration * fps))
        if duration <= 0:
            duration = frames / fps
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        return VideoInfo(str(path), int(frames), fps, first.width, first.height, duration, start)


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
    """VideoFrame -> uint8 [H, W, 3]: short side scaled to the target, centre cropped.

    Shrinking averages areas (no aliasing); enlarging interpolates bilinearly."""

    def __init__(self, width: int, height: int, out_h: int, out_w: int):
        s = max(out_h / height, out_w / width)
        self.sw, self.sh = max(out_w, round(width * s)), max(out_h, round(height * s))
        self.top, self.left = (self.sh - out_h) // 2, (self.sw - out_w) // 2
        self.out_h, self.out_w = out_h, out_w
        self.filter = "AREA" if self.sw * self.sh < width * height else "BILINEAR"

    def __call__(self, frame) -> np.ndarray:
        rgb = frame.to_ndarray(format="rgb24", width=self.sw, height=self.sh,
                               interpolation=self.filter)
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
    _check_request(start_seconds, num_frames, fps)
    _target_size(size)
    info = probe(path)
    fps = float(fps) if fps is not None else info.fps
    have = frames_available(info, start_seconds, fps)
    if have < num_frames:
        raise VideoError(f"{str(path)!r}: {info.duration:.2f} s long; from {start_seconds:g} s it "
                         f"holds {have} frames at {fps:g} fps, {num_frames} wanted")
    return read_frames(path, start_seconds + np.arange(num_frames) / fps, size, info=info)


def read_frames(path: str | Path, times, size, *, info: VideoInfo | None = None,
                past_end: str = "error", ties: str = "later") -> torch.Tensor:
    """The decoded frames nearest to ``times``: float32 [3, len(times), height, width] in [0, 1].

    times: float seconds [N], non-decreasing, from the stream's first frame.
    size: int (square) or (height, width); the short side is scaled to it and
    the centre cropped. info: the file's ``probe`` (probed when None).
    past_end: what a time after the last frame has shown for its period gets:
    "error" (VideoError: the file is shorter than its header says) or "repeat"
    (the last frame). ties: which of two frames equally near a time is kept,
    "later" (``read_clip``) or "earlier" (the training datasets' rule).
    """
    import av

    times = np.asarray(times, dtype=np.float64)
    if times.ndim != 1 or not times.size or not np.isfinite(times).all() or times[0] < 0 \
            or (np.diff(times) < 0).any():
        raise ValueError(f"times: expected non-decreasing seconds >= 0 [N], got shape "
                         f"{times.shape} starting {times.ravel()[:6].tolist()}")
    out_h, out_w = _target_size(size)
    if past_end not in ("error", "repeat") or ties not in ("later", "earlier"):
        raise ValueError(f"past_end, ties: expected 'error' or 'repeat', 'later' or 'earlier', "
                         f"got {past_end!r}, {ties!r}")
    info = info or probe(path)
    scale = _Scaler(info.width, info.height, out_h, out_w)
    pick = {"scale": scale, "period": 1.0 / info.fps, "repeat": past_end == "repeat",
            "later": ties == "later"}
    for seek in (times[0] > 0, False):
        with _open(path) as container:
            stream = _stream(container, path)
            stream.thread_type = "AUTO"
            try:
                if seek:  # lands on the key frame at or before the first time
                    container.seek(int(times[0] / stream.time_base) + (stream.start_time or 0),
                                   stream=stream)
                kept = _pick_frames(_timed(container.decode(stream), info, seek), times,
                                    seeked=seek, **pick)
            except av.FFmpegError as e:
                raise VideoError(f"cannot decode {str(path)!r}: damaged or truncated "
                                 f"({_reason(e)})") from None
        if kept is not None:
            break
    if len(kept) < len(times):
        raise VideoError(f"{str(path)!r}: the video data ends before {times[len(kept)]:.2f} s, "
                         f"earlier than its header says ({info.duration:.2f} s): truncated?")
    video = torch.from_numpy(np.stack(kept))                  # [T, H, W, 3] uint8
    return video.permute(3, 0, 1, 2).float().div_(255.0)


def _timed(frames, info: VideoInfo, seeked: bool):
    """(seconds from the first frame, frame) pairs; a frame without a timestamp gets None
    after a seek, else its place in the stream at the file's rate."""
    for k, frame in enumerate(frames):
        if frame.time is not None:
            yield frame.time - info.start, frame
        else:
            yield (None if seeked else k / info.fps), frame


def _pick_frames(frames, times: np.ndarray, *, scale: _Scaler, period: float, seeked: bool,
                 repeat: bool, later: bool) -> list[np.ndarray] | None:
    """For each time the nearest of the ``(time, frame)`` pairs, scaled; stops after the last.

    A frame kept for several times is scaled once; at most two decoded frames
    are held (the one before a time and the one after). Returns None after a
    seek that overshot (the first frame more than half a period past the first
    time) or left no frame or one without a timestamp: the caller then decodes
    from the start.
    Times past the last frame get it for one period, or all of them when ``repeat``.
    """
    kept: list[np.ndarray] = []
    prev = prev_t = prev_rgb = None
    k, n = 0, len(times)
    for t, frame in frames:
        if seeked and (t is None or (prev is None and t > times[0] + period / 2)):
            return None
        rgb = None
        while k < n and t >= times[k] - _EPS:
            after, before = t - times[k], (math.inf if prev is None else times[k] - prev_t)
            if after < before or (after == before and later):
                rgb = scale(frame) if rgb is None else rgb
                kept.append(rgb)
            else:
                prev_rgb = scale(prev) if prev_rgb is None else prev_rgb
                kept.append(prev_rgb)
            k += 1
        if k == n:
            return kept
        prev, prev_t, prev_rgb = frame, t, rgb
    if prev is None:  # nothing decoded: after a seek past the end, decode from the start
        return None if seeked else kept
    end = math.inf if repeat else prev_t + period - _EPS
    while k < n and times[k] < end:
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
