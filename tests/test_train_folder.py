"""Training from a folder of real mp4 files (issue 16, item 5).

The files are made with PyAV (libx264, a keyframe every 6 frames) at several
sizes and frame rates; frame k of a file is flat grey at level ``level(k)`` so
a decoded frame names itself. Shown here: a clip decodes only its own frames
(seek, then stop), scaled down while decoding; many clips per video; Ctrl-C
(SIGINT) in the middle of ``nbp train`` leaves a checkpoint and a loadable
model and prints one line; ``--resume`` says so and continues with identical
losses; ``--resume`` on an empty folder is refused; and the README's three
training steps run as written (with tiny sizes appended).
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nbp
from nbp import video
from nbp.cli import main
from nbp.data import VideoFolder

pytestmark = pytest.mark.usefixtures("one_thread")

PACKAGE_ROOT = Path(nbp.__file__).resolve().parents[1]
GOP = 6


def level(k):
    return 20 + 7 * k


def write_mp4(path, width, height, fps, seconds):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "4", "g": str(GOP), "keyint_min": str(GOP), "bf": "0"}
        for k in range(int(fps * seconds)):
            img = np.full((height, width, 3), level(k), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def grey(video):
    """float [3, T, H, W] -> per-frame grey level (0..255)."""
    return (video[1].mean(dim=(1, 2)) * 255).numpy()


def frame_index(video):
    return np.round((grey(video) - 20) / 7).astype(int)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_mp4(root / "Walk" / "qcif.mp4", 176, 144, 12, 2)       # 24 frames
    write_mp4(root / "Walk" / "wide.mp4", 320, 136, 25, 1)       # 25 frames, 2.35:1
    write_mp4(root / "Jump" / "small.mp4", 96, 64, 15, 2)        # 30 frames
    return root


def test_clips_per_video_cut_each_video_evenly(folder):
    ds = VideoFolder(folder, resolution=16, num_frames=5, frame_stride=2, sampling="start",
                     clips_per_video=3)
    assert len(ds) == 9 and ds.describe()["clips_per_video"] == 3
    names = [p.name for p in ds.files]
    qcif = names.index("qcif.mp4") * 3
    # 24 frames, a window of 9: the slack of 15 is cut in 3 shares starting at 0, 5, 10
    for clip, first in enumerate((0, 5, 10)):
        item = ds[qcif + clip]
        assert item["video"].shape == (3, 5, 16, 16) and item["label"] == ds.classes.index("Walk")
        assert list(frame_index(item["video"])) == [first + 2 * i for i in range(5)]
    centre = VideoFolder(folder, resolution=16, num_frames=4, fps=6, clips_per_video=2)
    small = names.index("small.mp4") * 2                          # 30 frames at 15 fps = 1.93 s
    starts = [frame_index(centre[small + j]["video"]) for j in range(2)]
    for idx in starts:                                            # 6 fps: every 2.5th frame
        assert np.all(np.abs(np.diff(idx) - 2.5) <= 0.5), idx
    assert starts[0][0] < starts[1][0]
    with pytest.raises(ValueError, match="clips_per_video"):
        VideoFolder(folder, clips_per_video=0)
    with pytest.raises(IndexError):
        ds[9]


def test_a_clip_decodes_only_its_frames_scaled_down(folder, monkeypatch):
    path = folder / "Walk" / "qcif.mp4"
    info = video.probe(path)
    assert (info.frames, info.fps, info.height, info.width) == (24, 12.0, 144, 176)
    seen = []
    real = video._pick_frames

    def counting(frames, times, **kwargs):
        def walk():
            for t, f in frames:
                seen.append((t, f.width))
                yield t, f
        return real(walk(), times, **kwargs)

    monkeypatch.setattr(video, "_pick_frames", counting)
    times = np.array([14, 15, 16, 17]) / info.fps
    clip = video.read_frames(path, times, (16, 19), info=info, past_end="repeat", ties="earlier")
    assert clip.shape == (3, 4, 16, 19)                           # scaled in the decoder
    assert list(frame_index(clip)) == [14, 15, 16, 17]
    decoded = [round(t * info.fps) for t, _ in seen]
    assert decoded == list(range(12, 18))                         # keyframe 12 to the clip's end
    assert all(w == 176 for _, w in seen)


def test_unreadable_files_are_one_clear_error(folder, tmp_path):
    bad = tmp_path / "Walk" / "broken.mp4"
    bad.parent.mkdir()
    bad.write_text("not a video")
    (tmp_path / "Walk" / "truncated.mp4").write_bytes((folder / "Walk" / "qcif.mp4").read_bytes()[:900])
    ds = VideoFolder(tmp_path, resolution=16, num_frames=5)
    for i, name in enumerate(("broken.mp4", "truncated.mp4")):
        with pytest.raises(ValueError, match=f"cannot (read|decode) .*{name}"):
            ds[i]


def test_cli_folder_flags(folder, tmp_path, capsys):
    args = ["train", "tokenizer", "--data", str(folder), "--out", str(tmp_path / "o"), "--steps", "1",
            "--no-progress"]
    assert main([*args, "--num-clips", "5"]) == 2
    assert "--num-clips: applies to --data synthetic" in capsys.readouterr().err
    assert main(["train", "tokenizer", "--out", str(tmp_path / "o"), "--clips-per-video", "2",
                 "--steps", "1", "--no-progress"]) == 2
    assert "--clips-per-video: applies to a video folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*args[:4], "--out", str(tmp_path / "empty"), "--resume", "--steps", "1"]) == 2
    assert "nothing to resume" in capsys.readouterr().err and not any((tmp_path / "empty").iterdir())
    assert not (tmp_path / "o").exists()


def train_args(folder, out):
    return ["train", "tokenizer", "--data", str(folder), "--out", str(out), "--resolution", "16",
            "--num-frames", "9", "--clips-per-video", "3", "--sampling", "random", "--steps", "500",
            "--batch", "2", "--log-every", "1", "--ckpt-every", "1000", "--threads", "1",
            "--no-progress"]


def records(out):
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")}
            for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def test_sigint_checkpoints_and_resume_continues_exactly(folder, tmp_path, capsys, interrupt_when_logged):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACKAGE_ROOT)}
    # decoding in a worker process; the signal goes to the whole process group, as a terminal's does
    proc = subprocess.Popen([sys.executable, "-m", "nbp.cli", *train_args(folder, out), "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stdout, stderr = interrupt_when_logged(proc, out / "log.jsonl")
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    found = re.fullmatch(r"stopped at step (\d+), checkpoint at (.+), resume with the same command "
                         r"plus --resume", stderr.strip())
    assert found and Path(found[2]) == out / "checkpoint.pt", stderr
    step = int(found[1])
    assert 3 <= step < 500
    from nbp.tokenizer import VideoTokenizer
    from nbp.train.checkpoint import read_checkpoint

    assert read_checkpoint(out / "checkpoint.pt")["step"] == step
    VideoTokenizer.from_pretrained(out / "model")                 # a loadable model was left
    assert [r["step"] for r in records(out)] == list(range(1, step + 1))

    assert main([*train_args(folder, out), "--resume", "--stop-at", str(step + 2)]) == 0
    assert f"resumed from step {step}" in capsys.readouterr().out
    ref = tmp_path / "ref"
    assert main([*train_args(folder, ref), "--stop-at", str(step + 2)]) == 0
    assert records(out) == records(ref)                          # losses, PSNR, grad norms, lr


def readme_commands():
    text = (PACKAGE_ROOT / "README.md").read_text()
    section = text.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:sh|bash)?\n(.*?)```", section, flags=re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    return [shlex.split(ln) for ln in lines if ln.strip()]


TINY = {"tokenizer": ["--steps", "2", "--num-clips", "4", "--no-progress"],
        "tokens": ["--num-clips", "4", "--no-progress"],
        "transformer": ["--steps", "2", "--no-progress"]}


def test_readme_training_steps_run(tmp_path, monkeypatch):
    commands = readme_commands()
    steps = [c[2] for c in commands if c[:2] == ["nbp", "train"]]
    assert steps == ["tokenizer", "tokens", "transformer"], commands
    monkeypatch.chdir(tmp_path)
    for cmd in commands:
        extra = TINY.get(cmd[2], []) if cmd[1] == "train" else []
        assert main(cmd[1:] + extra) == 0, cmd
    from nbp import NBPTransformer

    assert NBPTransformer.from_pretrained(tmp_path / "runs" / "nbp" / "model").config.cond_len == 1
    assert any(p.suffix == ".gif" for p in tmp_path.iterdir())   # the generated sample
