"""Procedural bouncing-sprite videos: a dataset that needs no download.

Each clip shows ``num_sprites`` anti-aliased coloured shapes moving at a
constant velocity and bouncing off the walls, over a smooth background (a flat
colour or a linear gradient). Smooth backgrounds and soft sprite edges keep the
clips learnable for a tiny tokenizer; the motion makes frame prediction
meaningful (the true continuation is the ground truth).

Backgrounds: ``"smooth"`` draws continuous random colours and gradient angles;
``"palette"`` draws them from a few discrete values (8 dull colours, 8 angles),
so a small codebook can represent every background exactly (the demo models).

Clip ``i`` of seed ``s`` is a pure function of ``(s, i)`` and the rendering
options, so it is the same on every worker and rank.

Classes: the first sprite (drawn on top) defines the label,
``label = shape_index * 4 + direction_index``, where the direction is the
quadrant of its initial velocity (see ``CLASS_NAMES``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["SHAPES", "DIRECTIONS", "CLASS_NAMES", "BACKGROUNDS", "SyntheticVideos", "render_clip"]

SHAPES = ("square", "circle", "triangle")
# Quadrant of the first sprite's initial velocity (image coordinates: y grows downwards).
DIRECTIONS = ("right-down", "left-down", "left-up", "right-up")
CLASS_NAMES = tuple(f"{s} moving {d}" for s in SHAPES for d in DIRECTIONS)

# Saturated sprite colours; backgrounds are drawn darker and duller so the
# sprites always stand out.
_PALETTE = np.array([[0.95, 0.2, 0.2], [0.2, 0.85, 0.3], [0.25, 0.45, 1.0],
                     [1.0, 0.85, 0.15], [0.95, 0.35, 0.95], [0.2, 0.9, 0.95]], dtype=np.float32)
_BG_PALETTE = np.array([[0.1, 0.1, 0.1], [0.45, 0.1, 0.1], [0.1, 0.4, 0.15], [0.1, 0.15, 0.45],
                        [0.45, 0.4, 0.1], [0.35, 0.1, 0.4], [0.1, 0.4, 0.45], [0.5, 0.5, 0.5]],
                       dtype=np.float32)
BACKGROUNDS = ("smooth", "palette")


def _bounce(start: np.ndarray, vel: np.ndarray, lo: np.ndarray, hi: np.ndarray,
            t: np.ndarray) -> np.ndarray:
    """Positions [T, n] of points moving at ``vel`` reflected into [lo, hi] (triangle wave)."""
    span = hi - lo
    u = np.mod(start - lo + vel * t[:, None], 2 * span)
    return lo + np.where(u <= span, u, 2 * span - u)


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a sprite of radius ``r`` at offsets (dx, dy) in pixels."""
    if shape == "square":
        sd = np.maximum(np.abs(dx), np.abs(dy)) - r * 0.85
    elif shape == "circle":
        sd = np.sqrt(dx * dx + dy * dy) - r
    else:  # equilateral triangle pointing up, as the max of three half-plane distances
        c, s = 0.5, np.sqrt(3.0) / 2
        sd = np.maximum(np.maximum(dy - r * c, -s * dx - c * dy - r * c), s * dx - c * dy - r * c)
    return np.clip(0.5 - sd, 0.0, 1.0)


def _check_background(background: str) -> None:
    if background not in BACKGROUNDS:
        raise ValueError(f"background: expected one of {BACKGROUNDS}, got {background!r}")


def _background(rng: np.random.Generator, res: int, kind: str) -> np.ndarray:
    """A flat colour or a linear gradient between two dull colours, [H, W, 3] float32."""
    palette = kind == "palette"
    if palette:
        c0, c1 = _BG_PALETTE[rng.integers(0, len(_BG_PALETTE), size=2)]
    else:
        c0, c1 = rng.uniform(0.05, 0.55, size=(2, 3)).astype(np.float32)
    if rng.random() < 0.3:
        c1 = c0
    angle = rng.integers(0, 8) * (np.pi / 4) if palette else rng.uniform(0, 2 * np.pi)
    coords = (np.arange(res, dtype=np.float32) + 0.5) / res - 0.5
    g = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]   # [H, W] in ~[-0.71, 0.71]
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    return c0 + (c1 - c0) * g[..., None]


def render_clip(seed: int, index: int, *, resolution: int = 32, num_frames: int = 17,
                num_sprites: tuple[int, int] = (1, 1), speed: tuple[float, float] = (0.02, 0.05),
                size: tuple[float, float] = (0.12, 0.2),
                background: str = "smooth") -> tuple[np.ndarray, int]:
    """Render clip ``index`` of ``seed``.

    Returns (video float32 [3, T, H, W] in [0, 1], label int in [0, len(CLASS_NAMES))).
    ``speed`` is in image widths per frame, ``size`` the sprite radius in image widths,
    ``num_sprites`` an inclusive (min, max) range, ``background`` one of ``BACKGROUNDS``.
    """
    _check_background(background)
    rng = np.random.default_rng([int(seed), int(index)])
    res, T = int(resolution), int(num_frames)
    n = int(rng.integers(num_sprites[0], num_sprites[1] + 1))
    shapes = rng.integers(0, len(SHAPES), size=n)
    colours = _PALETTE[rng.choice(len(_PALETTE), size=n, replace=n > len(_PALETTE))]
    radius = rng.uniform(*size, size=n) * res
    # Keep velocities away from the axes so the direction class is unambiguous.
    quadrant = rng.integers(0, 4, size=n)
    angle = (quadrant + rng.uniform(0.15, 0.85, size=n)) * (np.pi / 2)
    speed_px = rng.uniform(*speed, size=n) * res
    vel = np.stack([np.cos(angle), np.sin(angle)], axis=1) * speed_px[:, None]     # [n, 2] (x, y)
    lo, hi = radius[:, None].repeat(2, 1), res - radius[:, None].repeat(2, 1)
    start = rng.uniform(lo, hi)
    t = np.arange(T, dtype=np.float64)
    pos = np.stack([_bounce(start[:, a], vel[:, a], lo[:, a], hi[:, a], t) for a in range(2)], -1)

    frames = np.broadcast_to(_background(rng, res, background), (T, res, res, 3)).copy()
    pix = np.arange(res, dtype=np.float32) + 0.5
    for k in reversed(range(n)):  # sprite 0 last, on top: it defines the label
        dx = pix[None, None, :] - pos[:, k, 0, None, None].astype(np.float32)   # [T, 1, W]
        dy = pix[None, :, None] - pos[:, k, 1, None, None].astype(np.float32)   # [T, H, 1]
        a = _coverage(SHAPES[shapes[k]], dx, dy, float(radius[k]))[..., None]  # [T, H, W, 1]
        frames += a * (colours[k] - frames)
    label = int(shapes[0]) * len(DIRECTIONS) + int(quadrant[0])
    return np.ascontiguousarray(frames.transpose(3, 0, 1, 2), dtype=np.float32), label


class SyntheticVideos(Dataset):
    """``num_clips`` procedural clips; item ``i`` is ``render_clip(seed, i, ...)``.

    Items are dicts ``{"video": float32 [3, T, H, W] in [0, 1], "label": int}``.
    """

    class_names = CLASS_NAMES

    def __init__(self, num_clips: int, *, resolution: int = 32, num_frames: int = 17, seed: int = 0,
                 num_sprites: tuple[int, int] = (1, 1), speed: tuple[float, float] = (0.02, 0.05),
                 size: tuple[float, float] = (0.12, 0.2), background: str = "smooth"):
        if int(num_clips) < 1:
            raise ValueError(f"num_clips: expected a positive int, got {num_clips!r}")
        if int(resolution) < 8:
            raise ValueError(f"resolution: expected an int >= 8, got {resolution!r}")
        if int(num_frames) < 1:
            raise ValueError(f"num_frames: expected a positive int, got {num_frames!r}")
        lo, hi = num_sprites
        if not 1 <= lo <= hi:
            raise ValueError(f"num_sprites: expected (min, max) with 1 <= min <= max, "
                             f"got {num_sprites!r}")
        _check_background(background)
        self.num_clips, self.seed = int(num_clips), int(seed)
        self.options = dict(resolution=int(resolution), num_frames=int(num_frames),
                            num_sprites=(int(lo), int(hi)), speed=tuple(speed), size=tuple(size),
                            background=background)

    @property
    def num_classes(self) -> int:
        return len(CLASS_NAMES)

    def describe(self) -> dict:
        """JSON-able description (recorded in checkpoints and token caches)."""
        return {"kind": "synthetic", "num_clips": self.num_clips, "seed": self.seed,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> dict:
        if not -self.num_clips <= index < self.num_clips:
            raise IndexError(f"index {index} out of range for {self.num_clips} clips")
        video, label = render_clip(self.seed, index % self.num_clips, **self.options)
        return {"video": torch.from_numpy(video), "label": label}
