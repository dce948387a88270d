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


def test_machine_info_records_isa_caps(monkeypatch):
    """A run with the libraries held to AVX2 (standing for an AVX2-only CPU) says so."""
    from nbp.commands.bench import ISA_CAP_ENVS, machine_info
    for name in ISA_CAP_ENVS:
        monkeypatch.delenv(name, raising=False)
    assert machine_info("cpu")["isa_caps"] == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("NBP_CPU_ISA", "avx2")
    info = machine_info("cpu")
    assert info["isa_caps"] == {"NBP_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert info["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_machine_tag_tells_apart_cpus_behind_one_generic_name():
    from nbp.commands.bench import machine_tag
    zen4 = {"cpu": "AMD EPYC", "cpu_family": "25", "cpu_model": "17", "cpu_cores": 2}
    zen5 = dict(zen4, cpu_family="26", cpu_model="2")
    assert machine_tag(zen4) == "AMD-EPYC-f25m17-2c"
    assert machine_tag(zen5) == "AMD-EPYC-f26m2-2c"
    named = dict(zen4, cpu="AMD EPYC 9554 64-Core Processor")   # a model number: name alone
    assert machine_tag(named) == "AMD-EPYC-9554-64-Core-Processor-2c"
    assert machine_tag({"cpu": "AMD EPYC", "cpu_cores": 2}) == "AMD-EPYC-2c"


# --- nbp generate --input on real video files ------------------------------------------

from test_video import CLIPS, make_video  # noqa: E402  (the clip maker, shared)


def _published_frame_prediction_model(root, fps):
    """A tiny unconditional K600-style generator saved as a Lightning .ckpt (published
    layout, training flags in hyper_parameters.args) and a 64000-code tiny tokenizer:
    9x32x32 clips -> 3x4x4 codes, L = 4, position table 48 - 4 = 44."""
    import argparse

    from nbp.config import TransformerConfig
    from nbp.model import NBPTransformer
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer

    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.from_preset("tiny", fsq_levels=(8, 8, 8, 5, 5, 5))) \
        .save_pretrained(root / "tok")
    cfg = TransformerConfig(vocab_size=64000, n_layer=2, n_head=2, n_embd=16, max_seq_len=44,
                            latent_shape=(3, 4, 4), block_shape=(1, 1, 4), codebook_size=64000)
    args = argparse.Namespace(tokenizer="magvit2", vtokens=False, vtokens_pos=False,
                              unconditional=True, cond_stage_key="label", class_cond_dim=None,
                              cond_token_num=0, vocab_size=64000, block_size=44, n_layer=2,
                              n_head=2, n_embd=16, transformer_dropout=0.0, semi_ar=True,
                              token_number_per_step=4, starts_with_bov=False, hybrid=False,
                              sequence_length=9, resolution=32, fps=fps)
    sd = {"transformer." + k: v for k, v in NBPTransformer(cfg).state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"args": args}}, root / "k600_tiny.ckpt")
    return root / "k600_tiny.ckpt", root / "tok"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {(w, h, f): make_video(root / f"{w}x{h}_{f}.mp4", w, h, f) for w, h, f in CLIPS}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return _published_frame_prediction_model(tmp_path_factory.mktemp("published"), fps=10)


def _mp4(path):
    """(frames, height, width, fps) of a written mp4."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, s.height, s.width, float(s.average_rate)


@pytest.mark.parametrize("size", CLIPS)
def test_input_with_the_demo_model(clips, tmp_path, capsys, size):
    out = tmp_path / "pred.mp4"
    assert main(["generate", "--input", str(clips[size]), "--out", str(out), "--greedy"]) == 0
    text = capsys.readouterr().out
    if "demo model is unavailable" in text:
        pytest.skip("this checkout has no demo assets")
    assert "most likely" in text and "at 8 fps" in text
    assert _mp4(out) == (17, 16, 16, 8.0)          # the demo models' 17 frames at 16x16, 8 fps


@pytest.mark.parametrize("size", CLIPS)
def test_input_with_a_published_frame_prediction_model(clips, published, tmp_path, size):
    ckpt, tok = published
    base = ["generate", "--model", str(ckpt), "--tokenizer", str(tok), "--input", str(clips[size]),
            "--greedy"]
    out = tmp_path / "pred.mp4"
    assert main(base + ["--out", str(out)]) == 0
    assert _mp4(out) == (9, 32, 32, 10.0)          # the flags' fps = 10
    assert main(base + ["--out", str(out), "--fps", "input", "--start", "1"]) == 0
    assert _mp4(out) == (9, 32, 32, float(size[2]))


def test_input_side_by_side_marks_the_given_frames(clips, published, tmp_path):
    import imageio.v3 as iio

    ckpt, tok = published
    out = tmp_path / "sbs.gif"
    assert main(["generate", "--model", str(ckpt), "--tokenizer", str(tok), "--greedy",
                 "--input", str(clips[(640, 272, 25)]), "--out", str(out), "--side-by-side",
                 "--mark-given", "--scale", "2"]) == 0
    frames = iio.imread(out, index=None)[..., :3].astype(int)
    assert frames.shape[:3] == (9, 64, 128)        # input | prediction, 32x32 scaled by 2
    red = (frames[..., 0] > 200) & (frames[..., 1] < 80) & (frames[..., 2] < 80)
    assert red[:5, 0, :].all() and red[:5, :, 64].all()       # border on both given panels
    assert not red[5:, 0, :].all()                            # not on the predicted frames


def test_input_needs_enough_frames_after_start(clips, published, tmp_path, capsys):
    ckpt, tok = published
    out = tmp_path / "x.gif"
    argv = ["generate", "--model", str(ckpt), "--tokenizer", str(tok), "--out", str(out),
            "--input", str(clips[(176, 144, 12)])]
    assert main(argv + ["--start", "1.7"]) == 2                # 0.3 s at 10 fps: 3 frames
    err = capsys.readouterr().err
    assert "holds 3 frames at 10 fps from --start 1.7" in err and "--num-cond-frames 5" in err
    assert main(argv + ["--start", "2.5"]) == 2
    assert "--start" in capsys.readouterr().err
    assert main(argv + ["--num-cond-frames", "4"]) == 2
    assert "--num-cond-frames: expected 1 + 4k" in capsys.readouterr().err
    assert not out.exists()


def test_ntp_on_an_nbp_trained_model_names_mode(clips, published, tmp_path, capsys):
    ckpt, tok = published
    out = tmp_path / "x.gif"
    assert main(["generate", "--model", str(ckpt), "--tokenizer", str(tok), "--out", str(out),
                 "--input", str(clips[(176, 144, 12)]), "--mode", "ntp"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nbp generate: error: --mode ntp:") and "\n" not in err
    assert "L=4" in err and "(44)" in err and "--mode nbp" in err
    assert not out.exists()


def _write_truncated(path, clips):
    data = clips[(176, 144, 12)].read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_audio_only(path, clips):
    from test_video import _audio_only
    _audio_only(path)


@pytest.mark.parametrize("name, make", [
    ("missing.mp4", None),
    ("empty.mp4", lambda p, c: p.write_bytes(b"")),
    ("text.mp4", lambda p, c: p.write_text("hello\n" * 50)),
    ("cut.mp4", _write_truncated),
    ("sound.wav", _write_audio_only),
])
def test_unreadable_input_is_one_line_and_exit_2(clips, tmp_path, capsys, name, make):
    path = tmp_path / name
    if make is not None:
        make(path, clips)
    out = tmp_path / "out.gif"
    assert main(["generate", "--input", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("nbp generate: error:") and str(path) in err
    assert "\n" not in err and "Traceback" not in err
    assert captured.out == ""                        # refused before any model was loaded
    assert not [p for p in tmp_path.iterdir() if "out" in p.name]   # no output, no temporary


def test_frame_prediction_model_without_input_names_the_flag(published, tmp_path, capsys):
    ckpt, tok = published
    assert main(["generate", "--model", str(ckpt), "--tokenizer", str(tok),
                 "--out", str(tmp_path / "x.gif")]) == 2
    err = capsys.readouterr().err
    assert "--input FILE" in err and "generate_video" not in err and "predict_frames" not in err


def test_help_texts_are_correct(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "random tiny demo model" not in text
    assert "the trained demo model shipped with nbp" in text
    for flag in ("--input", "--start", "--fps", "--side-by-side", "--mark-given", "--trust-remote-code"):
        assert flag in text


def test_readme_real_video_example_runs(clips, tmp_path, monkeypatch, capsys):
    """The README's real-video command, as written, on a 640x272 clip named clip.mp4."""
    import shlex
    from pathlib import Path

    import imageio.v3 as iio

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("nbp generate --input clip.mp4")]
    assert lines, "README lacks the real-video example"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(clips[(640, 272, 25)].read_bytes())
    for line in lines:
        argv = shlex.split(line.split("#")[0])[1:]
        assert main(argv) == 0, line
    if "demo model is unavailable" in capsys.readouterr().out:
        pytest.skip("this checkout has no demo assets")
    assert iio.imread(tmp_path / "pred.gif", index=None).shape[:3] == (17, 64, 128)
    assert _mp4(tmp_path / "pred.mp4") == (17, 16, 16, 8.0)


def test_without_a_training_fps_the_input_rate_is_kept(clips, tmp_path, capsys):
    ckpt, tok = _published_frame_prediction_model(tmp_path, fps=None)
    out = tmp_path / "pred.mp4"
    assert main(["generate", "--model", str(ckpt), "--tokenizer", str(tok), "--greedy",
                 "--input", str(clips[(176, 144, 12)]), "--out", str(out)]) == 0
    assert "training frame rate is unknown: using the input's 12 fps" in capsys.readouterr().out
    assert _mp4(out) == (9, 32, 32, 12.0)
    assert main(["generate", "--model", str(ckpt), "--tokenizer", str(tok), "--greedy",
                 "--input", str(clips[(176, 144, 12)]), "--out", str(out), "--fps", "6"]) == 0
    assert _mp4(out) == (9, 32, 32, 6.0)


def test_mode_ntp_without_model_uses_the_demo_ntp_model(capsys):
    from nbp.cli import build_parser
    from nbp.commands.generate import _load

    model, _, kind = _load(build_parser().parse_args(["generate", "--mode", "ntp"]))
    if kind != "demo":
        pytest.skip("this checkout has no demo assets")
    assert model.config.block_size == 1 and "NTP demo model" in capsys.readouterr().out


def test_trust_remote_code_reaches_the_loaders(monkeypatch, tmp_path):
    import nbp.published
    from nbp.cli import build_parser
    from nbp.commands.generate import _load

    seen = []
    monkeypatch.setattr(nbp.published, "load_transformer", lambda path, **kw: seen.append(kw) or "m")
    monkeypatch.setattr(nbp.published, "load_tokenizer", lambda path, **kw: seen.append(kw) or "t")
    argv = ["generate", "--model", "m.ckpt", "--tokenizer", "t.pt"]
    assert _load(build_parser().parse_args(argv + ["--trust-remote-code"])) == ("m", "t", "file")
    assert _load(build_parser().parse_args(argv)) == ("m", "t", "file")
    assert seen == [{"trust_remote_code": True}] * 2 + [{"trust_remote_code": False}] * 2


@pytest.mark.parametrize("argv, match", [
    (["--fps", "fast"], "--fps: expected 'model', 'input' or a positive number"),
    (["--fps", "input"], "--fps input: needs --input"),
    (["--start", "2"], "--start: applies to given frames"),
    (["--side-by-side"], "--side-by-side: applies to given frames"),
    (["--mark-given"], "--mark-given: applies to given frames"),
    (["--batch", "0"], "--batch"),
])
def test_generate_flag_errors_name_the_flag(tmp_path, capsys, argv, match):
    out = tmp_path / "o.gif"
    assert main(["generate", "--random", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err and not out.exists()


def test_cond_ids_are_checked_against_the_model(tmp_path, capsys):
    """The random tiny model is class-conditional: one condition id in [0, 10)."""
    out = tmp_path / "o.gif"
    for ids in ("1,2", "x", "10"):
        assert main(["generate", "--random", "--out", str(out), "--cond-ids", ids]) == 2
        assert "--cond-ids: expected 1 comma-separated ids in [0, 10)" in capsys.readouterr().err
    assert main(["generate", "--random", "--out", str(out), "--cond-ids", "3", "--greedy"]) == 0


def test_predict_side_by_side_shows_the_held_out_clip(tmp_path, capsys):
    import imageio.v3 as iio

    out = tmp_path / "p.gif"
    assert main(["generate", "--predict", "--greedy", "--side-by-side", "--mark-given",
                 "--out", str(out)]) == 0
    if "demo model is unavailable" in capsys.readouterr().out:
        pytest.skip("this checkout has no demo assets")
    from nbp.demo import heldout_clips
    from nbp.io import video_to_uint8

    frames = iio.imread(out, index=None)[..., :3]
    truth = video_to_uint8(heldout_clips(1)[0][0])
    assert frames.shape[:3] == (17, 16, 32)
    # the left panel of the predicted frames is the held-out clip itself (GIF palette:
    # within a few levels)
    diff = abs(frames[5:, :, :16].astype(int) - truth[5:].astype(int))
    assert diff.mean() < 6


def test_input_with_a_multi_id_condition_needs_cond_ids(clips, tmp_path, capsys):
    """A non-hybrid bov model conditioned on 2 ids continues a clip under --cond-ids."""
    from nbp.config import TransformerConfig
    from nbp.model import NBPTransformer
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer

    torch.manual_seed(0)
    VideoTokenizer(TokenizerConfig.from_preset("tiny")).save_pretrained(tmp_path / "tok")
    cfg = TransformerConfig.from_preset("tiny", cond_len=2, cond_vocab_size=5, bov=True,
                                        vocab_size=1 + 5 + 64)
    NBPTransformer(cfg).save_pretrained(tmp_path / "gen")
    out = tmp_path / "o.mp4"
    argv = ["generate", "--model", str(tmp_path / "gen"), "--tokenizer", str(tmp_path / "tok"),
            "--input", str(clips[(176, 144, 12)]), "--out", str(out), "--greedy"]
    assert main(argv) == 2
    assert "--cond-ids: this model continues a clip under 2 condition ids" in capsys.readouterr().err
    assert main(argv + ["--cond-ids", "1,4"]) == 0
    assert _mp4(out) == (9, 32, 32, 12.0)
