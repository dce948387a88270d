"""Video quality metrics: PSNR, SSIM, Fréchet distance and FVD.

The definitions follow the evaluation code published with NBP
(``evaluation/common_metrics_on_video_quality``), which the paper's numbers use:

* **PSNR**: per frame, ``20 log10(1 / sqrt(mse))`` over [0, 1] pixels (100 dB when
  the frame's MSE is below 1e-10), averaged over frames and videos.
* **SSIM**: per frame and per colour channel, the Gaussian-window SSIM of Wang et
  al. (11x11 window, sigma 1.5, C1 = 0.01², C2 = 0.03², statistics over the
  *valid* window positions only, as the published code crops 5 pixels from every
  side after filtering), averaged over channels, frames and videos.
* **FVD** (StyleGAN-V protocol): every video [C, T, H, W] in [0, 1] is resized
  bilinearly (``align_corners=False``) so its shorter side is 224 (the other side
  rounded up), centre-cropped to 224x224, mapped to [-1, 1], and fed to the I3D
  TorchScript detector (``i3d_torchscript.pt`` of StyleGAN-V) called with
  ``rescale=False, resize=False, return_features=True``; the 400-d features of the
  real and generated sets are compared with the Fréchet distance (means and
  ``np.cov`` covariances, i.e. ``ddof=1``; only the mean term for a single video).

Videos are float tensors ``[B, C, T, H, W]`` with values in [0, 1] throughout.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "frechet_distance", "preprocess_fvd", "load_i3d", "i3d_features", "fvd"]

FVD_RESOLUTION = 224


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    for name, t in (("videos", a), ("reference", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 5 or not t.dtype.is_floating_point:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a float tensor [batch, C, T, H, W] in [0, 1], got {shape}")
    if a.shape != b.shape:
        raise ValueError(f"videos, reference: expected equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr_per_frame(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of every frame: videos, reference float [B, C, T, H, W] -> float64 [B, T]."""
    _check_pair(videos, reference)
    diff = videos.double() - reference.double()
    mse = diff.pow(2).mean(dim=(1, 3, 4))                                  # [B, T]
    value = 20 * torch.log10(1.0 / mse.clamp_min(1e-300).sqrt())
    return torch.where(mse < 1e-10, torch.full_like(value, 100.0), value)


def psnr(videos: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean per-frame PSNR (dB) of videos against reference, both float [B, C, T, H, W] in [0, 1]."""
    return float(psnr_per_frame(videos, reference).mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The 2-D window float64 [size, size] (outer product of the normalised 1-D Gaussian)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g /= g.sum()
    return g[:, None] * g[None, :]


def ssim_per_frame(videos: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM of every frame (mean over channels): float [B, C, T, H, W] -> float64 [B, T].

    Frames must be at least 11x11 (the window).
    """
    _check_pair(videos, reference)
    B, C, T, H, W = videos.shape
    if H < 11 or W < 11:
        raise ValueError(f"videos: SSIM needs frames of at least 11x11 pixels, got {H}x{W}")
    # One image per (b, c, t): [N, 1, H, W] in float64, as the published code computes.
    x = videos.double().permute(0, 2, 1, 3, 4).reshape(-1, 1, H, W)
    y = reference.double().permute(0, 2, 1, 3, 4).reshape(-1, 1, H, W)
    win = _gaussian_window().to(x.device)[None, None]
    mu_x, mu_y = F.conv2d(x, win), F.conv2d(y, win)
    sxx = F.conv2d(x * x, win) - mu_x ** 2
    syy = F.conv2d(y * y, win) - mu_y ** 2
    sxy = F.conv2d(x * y, win) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return m.mean(dim=(1, 2, 3)).view(B, T, C).mean(dim=2)


def ssim(videos: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over frames, channels and videos; both float [B, C, T, H, W] in [0, 1]."""
    return float(ssim_per_frame(videos, reference).mean())


def _sqrtm_trace(a: np.ndarray, b: np.ndarray) -> float:
    """trace(sqrtm(a @ b)) for symmetric PSD a, b [d, d] (float64).

    a @ b is similar to sqrt(a) b sqrt(a), which is symmetric PSD, so the trace of
    its square root is the sum of the square roots of that matrix's eigenvalues.
    """
    w, v = np.linalg.eigh(a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ b @ root_a
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def frechet_distance(feats_fake, feats_real) -> float:
    """Fréchet distance between two feature sets, float [N, d] and [M, d] (numpy or torch).

    ``|mu_f - mu_r|² + tr(S_f + S_r - 2 sqrtm(S_f S_r))`` with ``np.cov`` covariances;
    with a single generated sample only the mean term, as the published code does.
    """
    f = np.asarray(feats_fake.detach().cpu() if isinstance(feats_fake, torch.Tensor) else feats_fake,
                   dtype=np.float64)
    r = np.asarray(feats_real.detach().cpu() if isinstance(feats_real, torch.Tensor) else feats_real,
                   dtype=np.float64)
    if f.ndim != 2 or r.ndim != 2 or f.shape[1] != r.shape[1] or len(f) < 1 or len(r) < 2:
        raise ValueError(f"feats_fake, feats_real: expected [N >= 1, d] and [M >= 2, d] with the same "
                         f"d, got {f.shape} and {r.shape}")
    mean_term = float(np.square(f.mean(0) - r.mean(0)).sum())
    if len(f) == 1:
        return mean_term
    s_f, s_r = np.cov(f, rowvar=False), np.cov(r, rowvar=False)
    return mean_term + float(np.trace(s_f) + np.trace(s_r)) - 2 * _sqrtm_trace(s_f, s_r)


def preprocess_fvd(video: torch.Tensor, resolution: int = FVD_RESOLUTION) -> torch.Tensor:
    """One video float [C, T, H, W] in [0, 1] -> float [C, T, resolution, resolution] in [-1, 1]."""
    if not isinstance(video, torch.Tensor) or video.dim() != 4:
        raise ValueError("video: expected a float tensor [C, T, H, W] in [0, 1]")
    _, _, h, w = video.shape
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    # [C, T, H, W] is read by interpolate as a batch of C images with T channels.
    v = F.interpolate(video.float(), size=size, mode="bilinear", align_corners=False)
    h0, w0 = (v.shape[2] - resolution) // 2, (v.shape[3] - resolution) // 2
    v = v[:, :, h0:h0 + resolution, w0:w0 + resolution]
    return ((v - 0.5) * 2).contiguous()


def load_i3d(path: str | Path, device="cpu") -> torch.jit.ScriptModule:
    """The StyleGAN-V I3D detector (``i3d_torchscript.pt``) from a local file, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"i3d: no TorchScript file at {str(path)!r} (the StyleGAN-V "
                                f"i3d_torchscript.pt must be downloaded separately)")
    return torch.jit.load(str(path), map_location=device).eval()


@torch.no_grad()
def i3d_features(videos: torch.Tensor, detector, *, batch_size: int = 10,
                 resolution: int = FVD_RESOLUTION) -> torch.Tensor:
    """Detector features float64 [B, d] of videos float [B, C, T, H, W] in [0, 1]."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        raise ValueError("videos: expected a float tensor [batch, C, T, H, W] in [0, 1]")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    device = next(iter(detector.parameters()), torch.empty(0)).device
    feats = []
    for i in range(0, len(videos), batch_size):
        x = torch.stack([preprocess_fvd(v, resolution) for v in videos[i:i + batch_size]]).to(device)
        feats.append(detector(x, rescale=False, resize=False, return_features=True).double().cpu())
    return torch.cat(feats)


def fvd(videos: torch.Tensor, reference: torch.Tensor, detector, *, batch_size: int = 10,
        resolution: int = FVD_RESOLUTION) -> float:
    """FVD between generated ``videos`` [N, C, T, H, W] and ``reference`` [M, C, T, H, W] in [0, 1].

    detector: the StyleGAN-V I3D TorchScript module (``load_i3d``) or any module with
    the same call signature (tests use a small stand-in).
    """
    f = i3d_features(videos, detector, batch_size=batch_size, resolution=resolution)
    r = i3d_features(reference, detector, batch_size=batch_size, resolution=resolution)
    return frechet_distance(f, r)
