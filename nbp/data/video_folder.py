"""Video files in the published UCF-101 / Kinetics-600 layouts, read with ``nbp.video``.

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
to ``resolution`` and the centre cropped to a square; a video gives
``clips_per_video`` items. Reading an item probes the file and reads the
clip's frames with ``nbp.video.read_frames`` (seek, decode only up to the last
frame, scale while converting; times past the end repeat the last frame), so
its cost follows the clip, not the file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from nbp.video import VideoInfo, probe, read_frames

__all__ = ["VIDEO_EXTENSIONS", "VideoFolder", "class_text", "clip_times"]

VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm", ".mkv", ".mov")


def class_text(class_name: str) -> str:
    """'ApplyEyeMakeup' -> 'apply eye makeup' (the published UCF prompt rule)."""
    return re.sub("([a-z])([A-Z])", r"\1 \2", class_name).replace("_", " ").lower()


def _window_start(slack: float, sampling: str, rng: np.random.Generator, whole: bool,
                  clip: int = 0, clips: int = 1) -> float:
    """Start of clip ``clip`` of ``clips``: chosen by ``sampling`` inside its share of the slack."""
    if slack <= 0:
        return 0
    lo, hi = (clip * slack // clips, (clip + 1) * slack // clips) if whole else (
        clip * slack / clips, (clip + 1) * slack / clips)
    if sampling == "start":
        return lo
    if sampling == "center":
        return (lo + hi) // 2 if whole else (lo + hi) / 2
    return int(rng.integers(lo, hi + 1)) if whole else float(rng.uniform(lo, hi))


def clip_times(info: VideoInfo, num_frames: int, fps: float | None, stride: int, sampling: str,
               rng: np.random.Generator, clip: int = 0, clips: int = 1) -> np.ndarray:
    """Times (float64 [num_frames], seconds from the first frame) of clip ``clip`` of ``clips``.

    With ``fps`` the frames are ``1 / fps`` apart (the video's own frame rate
    does not matter), else every ``stride``-th frame; times past the end take
    the last frame (short videos repeat it).
    """
    n = info.frames
    if fps is None:
        offsets = np.arange(num_frames) * stride
        first = _window_start(n - 1 - offsets[-1], sampling, rng, True, clip, clips)
        return np.minimum(first + offsets, n - 1) / info.fps
    offsets = np.arange(num_frames) / fps
    last = (n - 1) / info.fps
    return _window_start(last - offsets[-1], sampling, rng, False, clip, clips) + offsets


class VideoFolder(Dataset):
    """Clips from a folder of videos (UCF-101 / Kinetics-600 layouts).

    Items: ``{"video": float32 [3, num_frames, resolution, resolution] in [0, 1],
    "label": int, "text": str, "path": str}``. Each video gives ``clips_per_video``
    items (video ``i // clips_per_video``): its span is cut into that many equal
    shares and clip ``j`` starts in share ``j``, where ``sampling`` puts it:
    ``"center"`` (evaluation), ``"start"`` or ``"random"`` (training; drawn from
    ``(seed, index, epoch)`` so it is the same on every worker; see ``set_epoch``).
    Only the clip's frames are decoded, scaled down while decoding.
    """

    def __init__(self, root: str | Path, annotations: str | Path | None = None, *,
                 split: str = "train", resolution: int = 64, num_frames: int = 17,
                 fps: float | None = None, frame_stride: int = 1, sampling: str = "center",
                 seed: int = 0, clips_per_video: int = 1):
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
        if not isinstance(clips_per_video, (int, np.integer)) or isinstance(clips_per_video, bool) \
                or clips_per_video < 1:
            raise ValueError(f"clips_per_video: expected a positive int, got {clips_per_video!r}")
        self.clips_per_video = int(clips_per_video)
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
        return {"kind": "video_folder", "root": str(self.root), "num_clips": len(self),
                "num_videos": len(self.files),
                "resolution": self.resolution, "num_frames": self.num_frames, "fps": self.fps,
                "frame_stride": self.frame_stride, "sampling": self.sampling, "seed": self.seed,
                "clips_per_video": self.clips_per_video}

    def __len__(self) -> int:
        return len(self.files) * self.clips_per_video

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index: {index} is outside [0, {len(self)})")
        file, clip = divmod(int(index), self.clips_per_video)
        path = self.files[file]
        info = probe(path)
        rng = np.random.default_rng([self.seed, int(index), self.epoch])
        times = clip_times(info, self.num_frames, self.fps, self.frame_stride, self.sampling, rng,
                           clip, self.clips_per_video)
        video = read_frames(path, times, self.resolution, info=info, past_end="repeat", ties="earlier")
        return {"video": video, "label": self.labels[file], "text": class_text(path.parent.name),
                "path": str(path)}
