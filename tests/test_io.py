"""nbp.io: atomic writes and video files."""
import imageio.v3 as iio
import pytest
import torch

from nbp.io import atomic_path, save_video


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
