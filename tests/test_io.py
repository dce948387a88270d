"""nbp.io: atomic writes and video files."""
import os
import stat

import av
import imageio.v3 as iio
import pytest
import torch

from nbp.io import atomic_path, atomic_write_text, save_video


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("suffix", [".gif", ".mp4"])
def test_save_video_writes_all_frames(tmp_path, suffix):
    video = torch.rand(2, 3, 5, 16, 12)
    path = save_video(video, tmp_path / f"v{suffix}", fps=4)
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == 5 and frames.shape[1] == 16 and frames.shape[2] == 24


def test_save_video_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="path"):
        save_video(torch.rand(3, 2, 8, 8), tmp_path / "v.avi")
    with pytest.raises(ValueError, match="video"):
        save_video(torch.rand(4, 2, 8, 8), tmp_path / "v.gif")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    """mkstemp alone creates 0600; the files must get what open(path, "w") would give."""
    old = os.umask(umask)
    try:
        paths = [save_video(torch.rand(3, 2, 8, 8), tmp_path / "v.gif"),
                 save_video(torch.rand(3, 2, 8, 8), tmp_path / "v.mp4")]
        atomic_write_text(tmp_path / "t.json", "{}")
        with atomic_path(tmp_path / "sub" / "w.bin") as tmp:
            tmp.write_bytes(b"x")
        paths += [tmp_path / "t.json", tmp_path / "sub" / "w.bin"]
    finally:
        os.umask(old)
    assert {str(p.name): stat.S_IMODE(p.stat().st_mode) for p in paths} == {p.name: mode for p in paths}
    assert not [p for p in tmp_path.rglob(".*tmp*")]


@pytest.mark.parametrize("fps", [8, 12.5, 25, 29.97])
def test_save_video_mp4_plays_at_fps(tmp_path, fps):
    path = save_video(torch.rand(3, 6, 16, 16), tmp_path / "v.mp4", fps=fps)
    with av.open(str(path)) as c:
        assert float(c.streams.video[0].average_rate) == pytest.approx(fps)


@pytest.mark.parametrize("fps, delay_ms", [(8, 120), (10, 100), (25, 40), (30, 30), (200, 10)])
def test_save_video_gif_delay_is_the_nearest_centisecond(tmp_path, fps, delay_ms):
    from PIL import Image

    path = save_video(torch.rand(3, 3, 8, 8), tmp_path / "v.gif", fps=fps)
    with Image.open(path) as im:
        assert im.info["duration"] == delay_ms


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf"), "8"])
def test_save_video_rejects_bad_fps(tmp_path, fps):
    with pytest.raises(ValueError, match="fps"):
        save_video(torch.rand(3, 2, 8, 8), tmp_path / "v.gif", fps=fps)
    assert not any(tmp_path.iterdir())


def test_video_grid_tiles_rows_of_videos():
    from nbp.io import video_grid

    a, b = torch.rand(2, 3, 4, 5, 6), torch.rand(2, 3, 4, 5, 6)
    g = video_grid([a, b], scale=2)
    assert g.shape == (3, 4, 2 * 5 * 2, 2 * 6 * 2)
    assert torch.equal(g[:, :, 10:12, 12:14], b[1, :, :, :1, :1].expand(-1, -1, 2, 2))
    assert torch.equal(g[:, :, ::2, ::2][:, :, :5, :6], a[0])
