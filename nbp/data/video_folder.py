"""Video files in the published UCF-101 / Kinetics-600 layouts, decoded with PyAV.

Layouts (as in the authors' annotation lists, ``annotations/*.txt``):

* an annotation list: one clip per line, ``relative/path.ext<TAB>label``,
  paths relative to ``root`` (``UCF-101/ApplyEyeMakeup/v_..._c01.avi	1``,
  ``k600/val/OALI_5D8pV0_000174_000184.mp4	0``); the label column is optional;
* no list: every ``.avi``/``.mp4``/``.webm``/``.mkv`` under ``root/<split>``
  (or under ``root`` when that folder does not exist).

As in the published loader, the class of a clip is its parent folder's name
(``classes`` is the sorted list of them, ``label`` the index in it) and its
text prompt is that name with CamelCase split (``ApplyEyeMakeup`` ->
``apply eye makeup``). Each item holds ``num_frames`` frames sampled at
``fps`` (or every ``frame_stride``-th decoded frame), the short side resized
to ``resolution`` and the centre cropped to a square.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["VideoFolder", "VIDEO_EXTENSIONS", "decode_frames", "class_text"]

VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv", ".mov")


def class_text(class_name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup' (the published UCF prompt rule)."""
    return re.sub("([a-z])([A-Z])", r"\1 \2", class_name).replace("_", " ").lower()


def decode_frames(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """All frames of the first video stream: (uint8 [N, H, W, 3], float64 times [N] in seconds)."""
    import av

    frames, times = [], []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"video: {str(path)!r} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        for i, frame in enumerate(container.decode(stream)):
            frames.append(frame.to_ndarray(format="rgb24"))
            t = frame.time
            times.append(float(t) if t is not None else i / rate)
    if not frames:
        raise ValueError(f"video: {str(path)!r} decoded to zero frames")
    return np.stack(frames), np.asarray(times, dtype=np.float64)


def _window_start(slack: float, sampling: str, rng: np.random.Generator, whole: bool) -> float:
    if slack <= 0 or sampling == "start":
        return 0
    if sampling == "center":
        return slack // 2 if whole else slack / 2
    return int(rng.integers(0, int(slack) + 1)) if whole else float(rng.uniform(0, slack))


def _sample_indices(times: np.ndarray, num_frames: int, fps: float | None, stride: int,
                    sampling: str, rng: np.random.Generator) -> np.ndarray:
    """Indices (int64 [num_frames]) into the decoded frames; short videos repeat their last frame.

    With ``fps`` the frames nearest to the times ``start + k / fps`` are taken
    (the video's own frame rate does not matter), else every ``stride``-th frame.
    """
    n = len(times)
    if fps is None:
        offsets = np.arange(num_frames) * stride
        start = _window_start(n - 1 - offsets[-1], sampling, rng, whole=True)
        return np.minimum(start + offsets, n - 1).astype(np.int64)
    rel = times - times[0]
    offsets = np.arange(num_frames) / fps
    target = _window_start(rel[-1] - offsets[-1], sampling, rng, whole=False) + offsets
    idx = np.searchsorted(rel, target).clip(0, n - 1)
    prev = (idx - 1).clip(0, n - 1)
    return np.where(np.abs(rel[prev] - target) <= np.abs(rel[idx] - target), prev, idx).astype(np.int64)


def resize_center_crop(frames: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, r, r] in [0, 1]: short side to r, then centre crop."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0                   # [T, 3, H, W]
    h, w = x.shape[-2:]
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    x = x[:, :, top:top + resolution, left:left + resolution]
    return x.clamp(0, 1).permute(1, 0, 2, 3).contiguous()


class VideoFolder(Dataset):
    """Clips from a folder of videos (UCF-101 / Kinetics-600 layouts).

    Items: ``{"video": float32 [3, num_frames, resolution, resolution] in [0, 1],
    "label": int, "text": str, "path": str}``. ``sampling`` picks the window:
    ``"center"`` (evaluation), ``"start"`` or ``"random"`` (training; drawn from
    ``(seed, index, epoch)`` so it is the same on every worker; see ``set_epoch``).
    """

    def __init__(self, root: str | Path, annotations: str | Path | None = None, *,
                 split: str = "train", resolution: int = 64, num_frames: int = 17,
                 fps: float | None = None, frame_stride: int = 1, sampling: str = "center",
                 seed: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root: {str(self.root)!r} is not a directory")
        if sampling not in ("center", "start", "random"):
            raise ValueError(f"sampling: expected 'center', 'start' or 'random', got {sampling!r}")
        if int(num_frames) < 1 or int(resolution) < 1 or int(frame_stride) < 1:
            raise ValueError(f"num_frames, resolution and frame_stride must be positive ints, got "
                             f"{num_frames!r}, {resolution!r}, {frame_stride!r}")
        if fps is not None and not fps > 0:
            raise ValueError(f"fps: expected a positive number or None, got {fps!r}")
        self.files, labels = self._list(annotations, split)
        self.classes = sorted({p.parent.name for p in self.files})
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[p.parent.name] for p in self.files]
        self.list_labels = labels
        self.resolution, self.num_frames = int(resolution), int(num_frames)
        self.fps, self.frame_stride, self.sampling = fps, int(frame_stride), sampling
        self.seed, self.epoch = int(seed), 0

    def _list(self, annotations, split) -> tuple[list[Path], list[int | None]]:
        if annotations is not None:
            ann = Path(annotations)
            if not ann.is_file():
                raise FileNotFoundError(f"annotations: no annotation list at {str(ann)!r}")
            files, labels = [], []
            for line in ann.read_text().splitlines():
                if line.strip():
                    parts = line.strip().split("\t")
                    files.append(self.root / parts[0])
                    labels.append(int(parts[1]) if len(parts) > 1 else None)
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"annotations: {len(missing)} listed videos do not exist "
                                        f"under {str(self.root)!r}, e.g. {missing[0]!r}")
        else:
            base = self.root / split if (self.root / split).is_dir() else self.root
            files = sorted(Path(d) / f for d, _, fs in os.walk(base) for f in fs
                           if f.lower().endswith(VIDEO_EXTENSIONS))
            labels = [None] * len(files)
        if not files:
            where = f" (list {str(annotations)!r})" if annotations else ""
            raise ValueError(f"root: no videos ({', '.join(VIDEO_EXTENSIONS)}) found in "
                             f"{str(self.root)!r}{where}")
        return files, labels

    def set_epoch(self, epoch: int) -> None:
        """Change the random windows (``sampling="random"``) deterministically."""
        self.epoch = int(epoch)

    def describe(self) -> dict:
        return {"kind": "video_folder", "root": str(self.root), "num_clips": len(self.files),
                "resolution": self.resolution, "num_frames": self.num_frames, "fps": self.fps,
                "frame_stride": self.frame_stride, "sampling": self.sampling, "seed": self.seed}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        frames, times = decode_frames(path)
        rng = np.random.default_rng([self.seed, int(index), self.epoch])
        idx = _sample_indices(times, self.num_frames, self.fps, self.frame_stride, self.sampling, rng)
        video = resize_center_crop(torch.from_numpy(frames[idx]), self.resolution)
        name = path.parent.name
        return {"video": video, "label": self.labels[index], "text": class_text(name),
                "path": str(path)}
