"""nbp.video: probing and reading real video files made here with PyAV."""
from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from nbp.video import (VideoError, frames_available, mark_given, probe, read_clip, read_frames,
                       side_by_side)

REPO = Path(__file__).resolve().parents[1]
# (width, height, fps): the sizes and rates of ordinary footage; 2 s each
CLIPS = [(1280, 720, 30), (640, 272, 25), (176, 144, 12)]


def make_video(path, width: int, height: int, fps: int, seconds: float = 2.0, *, frame=None,
               faststart: bool = False, bit_rate: int = 300_000) -> Path:
    """An H.264 mp4 (ultrafast, low bit rate so 720p encodes in about a second).

    frame(i, n, height, width) -> uint8 [height, width, 3]; default: a gradient
    with a white bar crossing it and the blue channel rising with time.
    """
    n = int(round(fps * seconds))
    frame = frame or _moving_bar
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt, s.bit_rate = width, height, "yuv420p", bit_rate
        s.options = {"preset": "ultrafast"}
        for i in range(n):
            img = av.VideoFrame.from_ndarray(frame(i, n, height, width), format="rgb24")
            for packet in s.encode(img):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    return Path(path)


def _moving_bar(i, n, h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, i * 255 // n)], -1).astype(np.uint8)
    x0 = i * (w - w // 8) // n
    img[h // 3:h // 3 + h // 8, x0:x0 + w // 8] = 255
    return img


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {(w, h, f): make_video(root / f"{w}x{h}_{f}.mp4", w, h, f) for w, h, f in CLIPS}


@pytest.mark.parametrize("size", CLIPS)
def test_probe_describes_the_stream(clips, size):
    w, h, fps = size
    info = probe(clips[size])
    assert (info.width, info.height, info.fps, info.frames) == (w, h, fps, 2 * fps)
    assert info.duration == pytest.approx(2.0, abs=1e-3)
    assert frames_available(info, 0.0, 8) == 16 and frames_available(info, 1.5, 8) == 4
    assert frames_available(info, 2.0, 8) == 0


def test_read_clip_picks_the_frame_nearest_each_time(tmp_path):
    """Frame i is flat grey 8*i: the values read tell which frames were kept."""
    def grey(i, n, h, w):
        return np.full((h, w, 3), 8 * i, np.uint8)

    path = make_video(tmp_path / "grey.mp4", 64, 48, 12, frame=grey, bit_rate=2_000_000)
    video = read_clip(path, start_seconds=0.3, num_frames=8, fps=5, size=16)
    assert video.shape == (3, 8, 16, 16) and video.dtype == torch.float32
    index = (video.mean((0, 2, 3)) * 255 / 8).round().long().tolist()
    expected = [round((0.3 + k / 5) * 12) for k in range(8)]          # 3.6 -> 4, 6, 8.4 -> 8, ...
    assert index == expected
    native = read_clip(path, start_seconds=1.0, num_frames=12, size=16)  # fps None: the file's 12
    assert (native.mean((0, 2, 3)) * 255 / 8).round().long().tolist() == list(range(12, 24))


def test_read_clip_scales_the_short_side_and_crops_the_centre(tmp_path):
    """Wide frames: red left quarter, green right quarter, blue middle; the crop keeps blue."""
    def bands(i, n, h, w):
        img = np.zeros((h, w, 3), np.uint8)
        img[:, : w // 4, 0] = 255
        img[:, 3 * w // 4:, 1] = 255
        img[:, w // 4: 3 * w // 4, 2] = 255
        return img

    path = make_video(tmp_path / "wide.mp4", 640, 272, 25, seconds=0.4, frame=bands,
                      bit_rate=1_000_000)
    video = read_clip(path, num_frames=3, fps=8, size=16)      # 640x272 -> 38x16 -> 16x16
    assert video.shape == (3, 3, 16, 16)
    assert video[2].min() > 0.8 and video[:2].max() < 0.2
    tall = read_clip(path, num_frames=3, fps=8, size=(32, 8))  # short side is now the width
    assert tall.shape == (3, 3, 32, 8) and tall[2].min() > 0.8


def _flat_grey(i, n, h, w):
    return np.full((h, w, 3), 8 * i, np.uint8)


def _grey_index(video):
    return (video.mean((0, 2, 3)) * 255 / 8).round().long().tolist()


def test_read_frames_past_the_end_and_ties(tmp_path):
    """8 frames at 8 fps (exact timestamps): past the end, the last frame for one period and
    then an error, or the last frame for ever; a time halfway between two frames, either."""
    path = make_video(tmp_path / "grey.mp4", 64, 48, 8, seconds=1.0, frame=_flat_grey,
                      bit_rate=2_000_000)
    info = probe(path)
    within = np.array([6, 7, 7.9]) / 8                  # 7/8 s is shown until 1 s
    assert _grey_index(read_frames(path, within, 16, info=info)) == [6, 7, 7]
    past = np.array([6, 7, 8, 20]) / 8
    with pytest.raises(VideoError, match="ends before 1.00 s.*truncated"):
        read_frames(path, past, 16, info=info)
    repeated = read_frames(path, past, (8, 16), info=info, past_end="repeat")
    assert repeated.shape == (3, 4, 8, 16) and _grey_index(repeated) == [6, 7, 7, 7]
    halves = np.array([0.5, 2.5, 5.5]) / 8
    assert _grey_index(read_frames(path, halves, 16, info=info)) == [1, 3, 6]
    assert _grey_index(read_frames(path, halves, 16, info=info, ties="earlier")) == [0, 2, 5]
    for kwargs, name in [({"times": [0.5, 0.25]}, "times"), ({"times": []}, "times"),
                         ({"times": [-0.1]}, "times"), ({"past_end": "loop"}, "past_end"),
                         ({"ties": "nearest"}, "ties"), ({"size": (8,)}, "size")]:
        with pytest.raises(ValueError, match=name):
            read_frames(path, **{"times": [0.0], "size": 8, **kwargs})


def test_a_seek_that_overshoots_decodes_from_the_start(tmp_path):
    """MPEG-TS seeks by byte position and may land after the wanted time: read_clip then
    decodes from the first frame rather than keep a later one."""
    path = tmp_path / "grey.ts"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt, s.options = 64, 48, "yuv420p", {"g": "8", "bf": "2"}
        for i in range(30):
            for packet in s.encode(av.VideoFrame.from_ndarray(_flat_grey(i, 30, 48, 64), "rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    with av.open(str(path)) as c:                       # the seek read_frames makes first
        s = c.streams.video[0]
        c.seek(int(0.52 / s.time_base) + s.start_time, stream=s)
        assert next(c.decode(s)).time - s.start_time * s.time_base > 0.52 + 0.5 / 25
    clip = read_clip(path, start_seconds=0.52, num_frames=4, fps=25, size=16)
    assert _grey_index(clip) == [13, 14, 15, 16]


def _peak_rss_script(path: Path) -> str:
    """Peak RSS above the resident set before each read (Linux: VmHWM reset via clear_refs)."""
    return f"""
import json
import av
from nbp.video import read_clip
def status(key):
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(key + ":")) / 1024  # MiB
def rise(fn):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                      # peak := current
    before = status("VmRSS")
    out = fn()
    return out, status("VmHWM") - before
read_clip({str(path)!r}, num_frames=2, size=8)            # warm up: codecs and buffers
clip, used = rise(lambda: read_clip({str(path)!r}, num_frames=16, fps=8, size=128))
def whole():                                              # what decoding it all costs
    with av.open({str(path)!r}) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
_, whole_used = rise(whole)
print(json.dumps({{"clip": used, "whole": whole_used, "shape": list(clip.shape)}}))
"""


def test_read_clip_memory_is_bounded_by_the_frames_used(clips):
    """Peak RSS of a fresh process: 16 frames of a 2 s 720p clip vs decoding the whole file."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset and read the peak resident set")
    path = clips[(1280, 720, 30)]
    out = subprocess.run([sys.executable, "-c", _peak_rss_script(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["shape"] == [3, 16, 128, 128]
    # the kept frames are 0.8 MB as float; the decoder holds a few 1.4 MB YUV frames
    assert m["clip"] < 48, m
    assert m["whole"] > 120, m      # 60 RGB frames of 2.8 MB: the measurement sees them


def _text_file(p):
    p.write_text("not a video\n" * 100)


def _empty(p):
    p.write_bytes(b"")


def _audio_only(p):
    with wave.open(str(p), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000, np.int16).tobytes())


@pytest.mark.parametrize("name, make, match", [
    ("missing.mp4", None, "no such file"),
    ("empty.mp4", _empty, "empty"),
    ("text.mp4", _text_file, "not a readable video"),
    ("sound.wav", _audio_only, "no video stream"),
])
def test_unreadable_files_raise_one_line(tmp_path, name, make, match):
    path = tmp_path / name
    if make is not None:
        make(path)
    for call in (lambda: probe(path), lambda: read_clip(path, num_frames=1, size=8)):
        with pytest.raises(VideoError, match=match) as e:
            call()
        assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_truncated_files_raise(clips, tmp_path):
    """Index at the end (the default mp4): the half file has none. Index first: the data ends early."""
    data = clips[(176, 144, 12)].read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match="not a readable video"):
        probe(cut)
    fast = make_video(tmp_path / "fast.mp4", 176, 144, 12, faststart=True).read_bytes()
    cut_fast = tmp_path / "cut_fast.mp4"
    cut_fast.write_bytes(fast[: len(fast) // 2])
    assert probe(cut_fast).frames == 24                       # the header still promises 2 s
    with pytest.raises(VideoError, match="truncated"):
        read_clip(cut_fast, num_frames=24, size=8)


def test_read_clip_rejects_bad_requests(clips):
    path = clips[(176, 144, 12)]
    with pytest.raises(VideoError, match="holds 4 frames at 8 fps, 5 wanted"):
        read_clip(path, start_seconds=1.5, num_frames=5, fps=8, size=8)
    for kwargs, name in [(dict(size=0), "size"), (dict(size=(8, 8, 8)), "size"),
                         (dict(num_frames=0), "num_frames"), (dict(fps=-1.0), "fps"),
                         (dict(start_seconds=-1), "start_seconds")]:
        with pytest.raises(ValueError, match=name):
            read_clip(path, **{"num_frames": 2, "size": 8, **kwargs})


def test_mark_given_and_side_by_side():
    video = torch.zeros(2, 3, 4, 8, 6)
    marked = mark_given(video, 2, width=1)
    assert torch.equal(marked[:, 0, :2, 0, :], torch.ones(2, 2, 6))           # top edge, red
    assert torch.equal(marked[:, 0, :2, 3:5, 1:5], torch.zeros(2, 2, 2, 4))   # inside untouched
    assert torch.equal(marked[:, :, 2:], video[:, :, 2:])                      # later frames too
    assert video.abs().sum() == 0                                              # input unchanged
    short = torch.rand(3, 2, 8, 6)
    both = side_by_side(short, torch.rand(3, 4, 8, 6))
    assert both.shape == (3, 4, 8, 12)
    assert torch.equal(both[:, 2, :, :6], short[:, 1]) and torch.equal(both[:, 3, :, :6], short[:, 1])
