"""nbp.metrics against the published definitions (PSNR, SSIM, Fréchet distance, FVD protocol)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from nbp import metrics


def _videos(seed, shape=(2, 3, 4, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


# --- PSNR ----------------------------------------------------------------------

def test_psnr_known_mse_and_identical_frames():
    a = torch.zeros(1, 3, 2, 12, 12, dtype=torch.float64)
    b = a.clone()
    b[:, :, 0] = 0.1                                    # frame 0: mse 0.01 -> 20 dB; frame 1: identical
    per = metrics.psnr_per_frame(b, a)
    assert per[0, 0].item() == pytest.approx(20.0, abs=1e-9)
    assert per[0, 1].item() == 100.0
    assert metrics.psnr(b, a) == pytest.approx(60.0, abs=1e-9)


def test_psnr_is_a_mean_over_frames_not_over_pixels():
    ref = torch.zeros(1, 3, 2, 12, 12, dtype=torch.float64)
    x = ref.clone()
    x[:, :, 0] = 0.1
    x[:, :, 1] = 0.2
    pooled = -10 * math.log10((0.01 + 0.04) / 2)
    assert metrics.psnr(x, ref) == pytest.approx((20.0 + 20 * math.log10(1 / 0.2)) / 2, abs=1e-9)
    assert metrics.psnr(x, ref) != pytest.approx(pooled, abs=1e-3)


def test_psnr_bad_inputs():
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.psnr(torch.rand(1, 3, 2, 12, 12), torch.rand(1, 3, 3, 12, 12))
    with pytest.raises(ValueError, match="videos"):
        metrics.psnr(torch.rand(3, 2, 12, 12), torch.rand(3, 2, 12, 12))


# --- SSIM ----------------------------------------------------------------------

def _ssim_naive(img1: np.ndarray, img2: np.ndarray) -> float:
    """The published per-channel SSIM with explicit loops over the valid window positions."""
    k = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    k /= k.sum()
    win = np.outer(k, k)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    h, w = img1.shape
    vals = []
    for i in range(h - 10):
        for j in range(w - 10):
            p, q = img1[i:i + 11, j:j + 11], img2[i:i + 11, j:j + 11]
            mx, my = (win * p).sum(), (win * q).sum()
            sxx = (win * p * p).sum() - mx * mx
            syy = (win * q * q).sum() - my * my
            sxy = (win * p * q).sum() - mx * my
            vals.append(((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2)))
    return float(np.mean(vals))


def test_ssim_matches_the_published_formula():
    a = _videos(0, (1, 3, 2, 14, 13))
    b = (a + 0.2 * _videos(1, (1, 3, 2, 14, 13))).clamp(0, 1)
    per = metrics.ssim_per_frame(a, b)
    for t in range(2):
        want = np.mean([_ssim_naive(a[0, c, t].double().numpy(), b[0, c, t].double().numpy())
                        for c in range(3)])
        assert per[0, t].item() == pytest.approx(want, abs=1e-10)


def test_ssim_identity_symmetry_and_noise():
    a = _videos(2)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    b = (a + 0.3 * (_videos(3) - 0.5)).clamp(0, 1)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), abs=1e-12)
    assert 0 < metrics.ssim(a, b) < 0.99
    assert metrics.ssim(a, 0.5 * a) < metrics.ssim(a, 0.9 * a) < 1


def test_ssim_rejects_small_frames():
    with pytest.raises(ValueError, match="11x11"):
        metrics.ssim(torch.rand(1, 3, 2, 10, 16), torch.rand(1, 3, 2, 10, 16))


# --- Fréchet distance -------------------------------------------------------------

def test_frechet_distance_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    n, d = 4000, 3
    f = rng.normal(size=(n, d)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, -1.0])
    r = rng.normal(size=(n, d)) * np.array([2.0, 1.0, 0.5])
    sf, sr = np.cov(f, rowvar=False), np.cov(r, rowvar=False)
    # Empirical covariances are not exactly diagonal: compare with the exact formula on them.
    m = np.square(f.mean(0) - r.mean(0)).sum()
    w, v = np.linalg.eigh(sf)
    rs = v @ np.diag(np.sqrt(w)) @ v.T
    want = m + np.trace(sf + sr) - 2 * np.sqrt(np.linalg.eigvalsh(rs @ sr @ rs)).sum()
    assert metrics.frechet_distance(f, r) == pytest.approx(want, rel=1e-9)
    # ... and it approaches the population value |mu|^2 + sum (s_f - s_r)^2.
    pop = 1 + 0 + 1 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert metrics.frechet_distance(f, r) == pytest.approx(pop, abs=0.25)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    f, r = rng.normal(size=(50, 8)), rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8)) + 0.3
    sf, sr = np.cov(f, rowvar=False), np.cov(r, rowvar=False)
    s = linalg.sqrtm(sf @ sr)
    s = s[0] if isinstance(s, tuple) else s   # older SciPy returns (sqrtm, error)
    want = np.square(f.mean(0) - r.mean(0)).sum() + np.real(np.trace(sf + sr - 2 * s))
    assert metrics.frechet_distance(f, r) == pytest.approx(float(want), rel=1e-7)


def test_frechet_distance_edge_cases():
    r = np.random.default_rng(2).normal(size=(20, 4))
    assert metrics.frechet_distance(r, r) == pytest.approx(0.0, abs=1e-8)
    one = r[:1] + 1.0
    assert metrics.frechet_distance(one, r) == pytest.approx(np.square(one[0] - r.mean(0)).sum())
    with pytest.raises(ValueError, match="feats_fake"):
        metrics.frechet_distance(r[:, :3], r)
    with pytest.raises(ValueError, match="feats_fake"):
        metrics.frechet_distance(r, r[:1])


# --- FVD protocol -------------------------------------------------------------------

class _StandInI3D(nn.Module):
    """A small network with the StyleGAN-V detector's call signature (400-d features)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, kernel_size=(2, 8, 8), stride=(2, 8, 8))
        self.fc = nn.Linear(4, 400)

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        if rescale or resize or not return_features:
            raise RuntimeError("FVD must call the detector with rescale=False, resize=False, "
                               "return_features=True")
        return self.fc(torch.tanh(self.conv(x)).mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def detector_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "stand_in_i3d.pt"
    torch.jit.script(_StandInI3D()).save(str(path))
    return path


def test_preprocess_resizes_shorter_side_crops_and_rescales():
    v = torch.rand(3, 4, 20, 30)
    out = metrics.preprocess_fvd(v, resolution=32)
    assert out.shape == (3, 4, 32, 32)
    full = torch.nn.functional.interpolate(v, size=(32, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(out, (full[:, :, :, 8:40] - 0.5) * 2)
    const = metrics.preprocess_fvd(torch.full((3, 2, 16, 16), 0.75), resolution=24)
    assert torch.allclose(const, torch.full_like(const, 0.5))


def test_fvd_with_a_stand_in_detector(detector_path):
    det = metrics.load_i3d(detector_path)
    a, b = _videos(4, (6, 3, 4, 16, 16)), _videos(5, (6, 3, 4, 16, 16))
    assert metrics.fvd(a, a, det, batch_size=4, resolution=32) == pytest.approx(0.0, abs=1e-6)
    dark = a * 0.2
    far, near = metrics.fvd(dark, a, det, resolution=32), metrics.fvd(b, a, det, resolution=32)
    assert far > near > 0
    feats = metrics.i3d_features(a, det, batch_size=4, resolution=32)
    direct = det(torch.stack([metrics.preprocess_fvd(v, 32) for v in a]), rescale=False, resize=False,
                 return_features=True).double()
    assert feats.shape == (6, 400) and torch.allclose(feats, direct, atol=1e-6)


def test_load_i3d_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="i3d_torchscript"):
        metrics.load_i3d(tmp_path / "nope.pt")
