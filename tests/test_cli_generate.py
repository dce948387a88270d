"""``nbp generate`` and ``nbp bench`` (nbp/commands/generate.py, nbp/commands/bench.py)."""
from __future__ import annotations

import json

import imageio.v3 as iio
import pytest
import torch

from nbp.cli import main


def test_generate_writes_a_gif_with_random_demo_model(tmp_path, capsys):
    out = tmp_path / "demo.gif"
    assert main(["generate", "--out", str(out), "--random", "--seed", "1", "--batch", "2",
                 "--class-id", "4", "--top-k", "20", "--top-p", "0.9"]) == 0
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (9, 32, 64)          # 9 frames, 32x32, two videos side by side
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text and "steps" in text and " s (" in text


def test_generate_default_uses_the_shipped_demo_model(tmp_path, capsys):
    out = tmp_path / "demo.gif"
    assert main(["generate", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    if "demo model is unavailable" in text:
        pytest.skip("this checkout has no demo assets")
    assert "demo model shipped" in text
    assert iio.imread(out, index=None).shape[:3] == (17, 16, 16)


def test_generate_is_seeded(tmp_path):
    paths = [tmp_path / f"{i}.gif" for i in range(3)]
    for p, seed in zip(paths, (5, 5, 6)):
        assert main(["generate", "--out", str(p), "--random", "--seed", str(seed)]) == 0
    a, b, c = (iio.imread(p, index=None) for p in paths)
    assert (a == b).all() and not (a == c).all()


def test_generate_continues_an_input_video(tmp_path):
    """A frame-prediction model (no condition): --input is continued with predict_frames."""
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer
    from nbp.config import TransformerConfig
    from nbp.model import NBPTransformer

    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.from_preset("tiny")).save_pretrained(tmp_path / "tok")
    NBPTransformer(TransformerConfig.from_preset("tiny")).save_pretrained(tmp_path / "gen")
    video = (torch.rand(9, 32, 32, 3) * 255).to(torch.uint8).numpy()
    iio.imwrite(tmp_path / "in.gif", video, extension=".gif", duration=100, loop=0)
    out = tmp_path / "pred.gif"
    assert main(["generate", "--out", str(out), "--model", str(tmp_path / "gen"),
                 "--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "in.gif"),
                 "--greedy"]) == 0
    assert iio.imread(out, index=None).shape[:3] == (9, 32, 32)


@pytest.mark.parametrize("argv, match", [
    (["--out", "x.png"], "--out"),
    (["--fps", "0"], "--fps"),
    (["--tokenizer", "t"], "--tokenizer"),
    (["--top-p", "2"], "top_p"),
])
def test_generate_bad_arguments(tmp_path, capsys, argv, match):
    args = ["generate"] + [a if a != "x.png" else str(tmp_path / a) for a in argv]
    if "--out" not in argv:
        args += ["--out", str(tmp_path / "o.gif")]
    assert main(args) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o.gif").exists()


def test_bench_prints_ntp_vs_nbp_table(capsys):
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--top-k", "10",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "nbp" in text and "ntp" in text and "frames/s" in text
    rows = [ln.split() for ln in text.splitlines() if ln.split()[:1] in (["nbp"], ["ntp"])]
    steps = {r[0]: int(r[1]) for r in rows}
    assert steps == {"nbp": 4, "ntp": 16}           # 16 new tokens, L = 4


def test_machine_info_names_the_cpu():
    from nbp.commands.bench import machine_info, machine_tag
    info = machine_info("cpu")
    assert info["cpu"] and info["cpu_cores"] >= 1
    tag = machine_tag(info)
    assert tag and "/" not in tag and " " not in tag
    json.dumps(info)
