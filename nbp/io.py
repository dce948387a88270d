"""File output: atomic writes and video files (GIF / MP4)."""
from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_path", "atomic_write_text", "save_video", "video_to_uint8"]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no read-only query elsewhere: set and restore at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; rename it into place on success.

    Readers never see a half-written file, and a failure leaves any existing
    file untouched. The file gets the mode a plain ``open(path, "w")`` would
    give it (0666 less the umask; mkstemp alone would leave 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary keeps the real suffix so format-sniffing writers (video, safetensors) work
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp.", suffix=path.suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] float in [0, 1] -> [T, H, W, 3] uint8."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video: expected [3, T, H, W], got shape {tuple(video.shape)}")
    v = video.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def save_video(video: torch.Tensor, path: str | Path, fps: float = 8.0) -> Path:
    """Write a video ``[3, T, H, W]`` or a batch ``[B, 3, T, H, W]`` (tiled side by side).

    The format follows the suffix: ``.gif`` or ``.mp4`` (H.264, played at exactly
    ``fps``). GIF stores frame delays in 1/100 s, so its rate is the nearest one
    of 100/k fps (30 fps plays at 33.3). Written atomically, mode per the umask.
    """
    path = Path(path)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"path: expected a .gif or .mp4 file name, got {str(path)!r}")
    if not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    if video.dim() == 5:  # tile the batch horizontally: [3, T, H, B*W]
        video = torch.cat(list(video), dim=-1)
    frames = video_to_uint8(video)
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=10 * max(1, round(100 / fps)),
                        loop=0)
        else:
            h, w = frames.shape[1:3]
            if h % 2 or w % 2:  # yuv420p needs even sizes
                frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            iio.imwrite(tmp, frames, extension=".mp4", plugin="pyav", codec="libx264", fps=fps)
    return path


def video_grid(rows: list[torch.Tensor], scale: int = 1) -> torch.Tensor:
    """Videos tiled for one picture: rows of float [B, 3, T, H, W] (equal shapes) ->
    [3, T, len(rows) * H * scale, B * W * scale], each row's videos side by side."""
    grid = torch.cat([torch.cat(list(v), dim=-1) for v in rows], dim=-2)
    return grid.repeat_interleave(scale, dim=-1).repeat_interleave(scale, dim=-2)
