"""nbp.data: synthetic clips, video folders decoded with PyAV, token caches."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nbp.data import CLASS_NAMES, SyntheticVideos, TokenDataset, VideoFolder, extract_tokens, render_clip
from nbp.data.synthetic import _BG_PALETTE, DIRECTIONS, SHAPES, _bounce
from nbp.tokenizer import TokenizerConfig, VideoTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


# --- synthetic ---------------------------------------------------------------------------

def test_synthetic_items_and_determinism():
    ds = SyntheticVideos(6, resolution=16, num_frames=9, seed=5, num_sprites=(1, 3))
    item = ds[2]
    assert item["video"].shape == (3, 9, 16, 16) and item["video"].dtype == torch.float32
    assert 0.0 <= float(item["video"].min()) and float(item["video"].max()) <= 1.0
    assert 0 <= item["label"] < len(CLASS_NAMES) == len(SHAPES) * len(DIRECTIONS) == ds.num_classes
    again = SyntheticVideos(100, resolution=16, num_frames=9, seed=5, num_sprites=(1, 3))[2]
    assert torch.equal(item["video"], again["video"]) and item["label"] == again["label"]
    assert not torch.equal(ds[3]["video"], item["video"])
    other_seed = SyntheticVideos(6, resolution=16, num_frames=9, seed=6, num_sprites=(1, 3))[2]
    assert not torch.equal(other_seed["video"], item["video"])
    assert len({ds[i]["label"] for i in range(6)} | {0}) > 1


def test_synthetic_motion_is_visible_and_follows_the_label():
    """One sprite over a flat-or-gradient background: the changed pixels move in the label's direction."""
    hits = 0
    for i in range(12):
        video, label = render_clip(11, i, resolution=32, num_frames=3, speed=(0.04, 0.04))
        f0, f1 = video[:, 0], video[:, 1]
        assert np.abs(f1 - f0).max() > 0.1                  # the sprite moved
        d = DIRECTIONS[label % 4]
        # centre of the pixels the sprite covers, found as the most saturated pixels
        sat = [v.max(0) - v.min(0) for v in (f0, f1)]
        cy0, cx0 = np.argwhere(sat[0] >= sat[0].max() - 0.05).mean(0)
        cy1, cx1 = np.argwhere(sat[1] >= sat[1].max() - 0.05).mean(0)
        ok_x = (cx1 - cx0 > 0) == d.startswith("right")
        ok_y = (cy1 - cy0 > 0) == d.endswith("down")
        hits += ok_x and ok_y
    assert hits >= 10, hits                                  # a wall bounce may flip a few


def test_palette_backgrounds_use_only_palette_colours():
    """With background="palette" the corner pixels a sprite never covers are palette colours
    (a flat colour or a gradient between two of them at a multiple of 45 degrees)."""
    flat = 0
    for i in range(20):
        video, _ = render_clip(3, i, resolution=16, num_frames=2, background="palette", size=(0.1, 0.1))
        corners = video[:, 0, [0, 0, -1, -1], [0, -1, 0, -1]].T            # [4, 3]
        if np.allclose(corners, corners[:1]):
            flat += 1
            assert np.abs(_BG_PALETTE - corners[0]).sum(-1).min() < 1e-6
        assert video.min() >= 0.0 and video.max() <= 1.0
    assert 0 < flat < 20
    smooth, _ = render_clip(3, 0, resolution=16, num_frames=2)
    assert not np.array_equal(smooth, render_clip(3, 0, resolution=16, num_frames=2, background="palette")[0])


def test_bounce_stays_inside_and_reflects():
    t = np.arange(40, dtype=np.float64)
    p = _bounce(np.array([5.0]), np.array([3.0]), np.array([2.0]), np.array([20.0]), t)[:, 0]
    assert p.min() >= 2.0 and p.max() <= 20.0
    assert p[1] - p[0] == pytest.approx(3.0)
    assert (np.diff(p) < 0).any()                            # came back after hitting the wall


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="num_clips"):
        SyntheticVideos(0)
    with pytest.raises(ValueError, match="num_sprites"):
        SyntheticVideos(4, num_sprites=(2, 1))
    with pytest.raises(IndexError):
        SyntheticVideos(4)[4]
    with pytest.raises(ValueError, match="background"):
        SyntheticVideos(4, background="noise")
    with pytest.raises(ValueError, match="background"):
        render_clip(0, 0, background="noise")


# --- video folders ------------------------------------------------------------------------

def write_video(path, num_frames, fps, size=(24, 32)):
    """Frame k has grey level 8 * k (so decoded frames identify themselves)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for k in range(num_frames):
            img = np.full((*size, 3), 8 * k, dtype=np.uint8)
            img[:, : size[1] // 2, 0] = 200                 # a red left half, to check the crop
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def grey(video):
    """Per-frame grey level (0..255) from the green channel."""
    return (video[1].mean(dim=(1, 2)) * 255).numpy()


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    root = tmp_path_factory.mktemp("ucf")
    write_video(root / "UCF-101" / "ApplyEyeMakeup" / "v_a_g01.avi", 25, 10)
    write_video(root / "UCF-101" / "BoxingBag" / "v_b_g01.avi", 30, 20)
    write_video(root / "UCF-101" / "BoxingBag" / "v_b_g02.avi", 5, 10)
    ann = root / "ucf_train.txt"
    ann.write_text("UCF-101/BoxingBag/v_b_g01.avi\t17\nUCF-101/ApplyEyeMakeup/v_a_g01.avi\t1\n")
    return root, ann


def test_video_folder_annotation_list(ucf):
    root, ann = ucf
    ds = VideoFolder(root, ann, resolution=16, num_frames=17, sampling="start")
    assert len(ds) == 2 and ds.classes == ["ApplyEyeMakeup", "BoxingBag"]
    item = ds[0]
    assert item["video"].shape == (3, 17, 16, 16) and item["video"].dtype == torch.float32
    assert item["label"] == 1 and item["text"] == "boxing bag" and ds.list_labels == [17, 1]
    assert np.allclose(grey(item["video"]), 8 * np.arange(17), atol=4)
    # short side 24 -> 16, width 32 -> 21, centre crop keeps columns 2..17: red on the left
    red = item["video"][0, 0]
    assert red[:, :6].mean() > 0.7 and red[:, 12:].mean() < 0.2


def test_video_folder_fps_and_stride(ucf):
    root, ann = ucf
    # a 20 fps clip sampled at 10 fps: every second frame
    ds = VideoFolder(root, ann, resolution=16, num_frames=8, fps=10, sampling="start")
    assert np.allclose(grey(ds[0]["video"]), 8 * np.arange(0, 16, 2), atol=4)
    strided = VideoFolder(root, ann, resolution=16, num_frames=5, frame_stride=3, sampling="center")
    g = grey(strided[0]["video"])                           # 30 frames, window of 13: start 8
    assert np.allclose(g, 8 * (8 + 3 * np.arange(5)), atol=4)


def test_video_folder_walk_and_short_clips(ucf):
    root, _ = ucf
    ds = VideoFolder(root / "UCF-101", resolution=8, num_frames=9)
    assert len(ds) == 3 and ds.classes == ["ApplyEyeMakeup", "BoxingBag"]
    short = ds[[p.name for p in ds.files].index("v_b_g02.avi")]["video"]
    assert short.shape == (3, 9, 8, 8)
    assert np.allclose(grey(short)[4:], 8 * 4, atol=4)     # the last frame repeats


def test_video_folder_random_windows_are_reproducible(ucf):
    root, ann = ucf
    a = VideoFolder(root, ann, resolution=8, num_frames=4, sampling="random", seed=1)
    b = VideoFolder(root, ann, resolution=8, num_frames=4, sampling="random", seed=1)
    assert torch.equal(a[1]["video"], b[1]["video"])
    starts = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        starts.add(round(float(grey(a[1]["video"])[0]) / 8))
    assert len(starts) > 1


def test_video_folder_errors(tmp_path, ucf):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "notes.txt").write_text("no videos here")
    with pytest.raises(ValueError, match="no videos"):
        VideoFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        VideoFolder(tmp_path / "missing")
    root, _ = ucf
    bad = tmp_path / "list.txt"
    bad.write_text("UCF-101/Nope/v_x.avi\t3\n")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        VideoFolder(root, bad)
    with pytest.raises(ValueError, match="sampling"):
        VideoFolder(root, sampling="middle")


def test_cli_reports_empty_dataset(tmp_path, capsys):
    from nbp.cli import main

    (tmp_path / "videos").mkdir()
    rc = main(["train", "tokenizer", "--data", str(tmp_path / "videos"), "--out", str(tmp_path / "o"),
               "--steps", "1", "--no-progress"])
    assert rc == 2 and "no videos" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- token caches -------------------------------------------------------------------------

def test_extract_tokens_round_trip(tmp_path):
    torch.manual_seed(0)
    tok = VideoTokenizer(TokenizerConfig.from_preset("tiny")).eval()
    data = SyntheticVideos(5, resolution=16, num_frames=5, seed=2)
    path = extract_tokens(tok, data, tmp_path / "codes.safetensors", batch_size=2, progress=False)
    cache = TokenDataset(path)
    assert len(cache) == 5 and cache.latent_shape == (2, 2, 2)
    video = torch.stack([data[i]["video"] for i in range(5)])
    assert torch.equal(cache.codes, tok.encode(video))
    assert cache[3]["label"] == data[3]["label"]
    assert cache.meta["codebook_size"] == 64 and cache.meta["data"]["seed"] == 2


def test_token_cache_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no token cache"):
        TokenDataset(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a token cache"):
        TokenDataset(tmp_path / "x.safetensors")
