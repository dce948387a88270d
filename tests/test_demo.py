"""The demo models shipped in nbp/assets/demo: they load, reconstruct and predict held-out clips.

The bounds below are set from the measurements in nbp/assets/demo/MODEL_CARD.md with a
margin; a broken tokenizer (random weights: about 10 dB, the dataset-mean frame: about
16 dB) or a generator that ignores its input fails them.
"""
import json
import math

import pytest
import torch

from nbp import metrics
from nbp.demo import (DEMO_DIR, EVAL_SEED, NUM_COND_FRAMES, TRAIN_SEED, condition_ids,
                      generate_class, heldout_clips, load_demo, predict_frames)
from nbp.generate import FastGenerator

RECON_PSNR_FLOOR = 30.0     # dB on held-out clips (measured 31.8 on these 4, 32.4 on 64: MODEL_CARD.md)


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)   # tiny decode steps: thread hand-offs cost more than they save
    return load_demo()


@pytest.fixture(scope="module")
def clips():
    return heldout_clips(4)


def test_demo_models_load_with_the_documented_layout(demo):
    assert demo.path == DEMO_DIR
    assert demo.nbp.config.block_shape == (1, 1, 8) and demo.ntp.config.block_shape == (1, 1, 1)
    assert demo.nbp.config.latent_shape == demo.ntp.config.latent_shape == (9, 8, 8)
    n_nbp = sum(p.numel() for p in demo.nbp.parameters())
    n_ntp = sum(p.numel() for p in demo.ntp.parameters())
    assert n_nbp == n_ntp                                   # equal size (same config but L)
    assert next(demo.nbp.parameters()).dtype == torch.float32
    assert demo.tokenizer.codebook_size == demo.nbp.config.codebook_size == 1000


def test_load_demo_exposes_the_long_video_fine_tune(demo):
    assert demo.nbp_long is not None and demo.nbp_long.config == demo.nbp.config
    assert demo.model("nbp_long") is demo.nbp_long
    assert demo.long_model() == ("nbp_long", demo.nbp_long)
    assert next(demo.nbp_long.parameters()).dtype == torch.float32
    assert not torch.equal(demo.nbp_long.tok_emb.weight, demo.nbp.tok_emb.weight)  # fine-tuned


def _demo_copy(root, **dirs):
    """A demo dir at ``root`` linking the shipped models: name -> shipped dir to link."""
    root.mkdir()
    for name, src in dirs.items():
        (root / name).symlink_to(DEMO_DIR / src, target_is_directory=True)
    return root


def test_a_demo_dir_without_nbp_long_falls_back_to_nbp(tmp_path):
    demo = load_demo(_demo_copy(tmp_path / "d", tokenizer="tokenizer", nbp="nbp", ntp="ntp"))
    assert demo.nbp_long is None and demo.long_model() == ("nbp", demo.nbp)
    with pytest.raises(ValueError, match="'nbp_long' is not in"):
        demo.model("nbp_long")
    with pytest.raises(ValueError, match="which: expected"):
        demo.model("long")
    bad = _demo_copy(tmp_path / "bad", tokenizer="tokenizer", nbp="nbp", ntp="ntp", nbp_long="ntp")
    with pytest.raises(ValueError, match="nbp_long/ must have nbp/'s config"):
        load_demo(bad)


def test_tokenizer_reconstructs_heldout_clips(demo, clips):
    video, _ = clips
    recon = demo.tokenizer.decode(demo.tokenizer.encode(video))
    assert recon.shape == video.shape == (4, 3, 17, 16, 16)
    assert metrics.psnr(recon, video) > RECON_PSNR_FLOOR


def test_bfloat16_tokenizer_reconstructs_as_well():
    """--tokenizer-dtype auto runs the tokenizer in bfloat16 on CPUs with native bf16 matmul,
    on the condition (issue 15) that it reconstructs within 0.5 dB of float32: 16 held-out
    clips, the same weights cast (emulated bf16 where the CPU lacks it: same numbers)."""
    video, _ = heldout_clips(16)
    tok32 = load_demo().tokenizer
    tok16 = load_demo(dtype=torch.bfloat16).tokenizer
    codes32, codes16 = tok32.encode(video), tok16.encode(video)
    recon32, recon16 = tok32.decode(codes32), tok16.decode(codes16)
    assert recon16.dtype == torch.float32 and recon16.shape == video.shape
    drop = metrics.psnr(recon32, video) - metrics.psnr(recon16, video)
    assert abs(drop) < 0.5, drop
    assert (codes16 == codes32).float().mean() > 0.9   # the same codes, bar rounding ties


def _prediction_and_baseline(demo, clips):
    video, labels = clips
    gen = FastGenerator(demo.nbp, demo.tokenizer, device="cpu")
    pred = predict_frames(gen, video, labels)
    assert pred.shape == video.shape
    sl = slice(NUM_COND_FRAMES, None)
    truth = video[:, :, sl]
    return pred[:, :, sl], truth, video[:, :, NUM_COND_FRAMES - 1:NUM_COND_FRAMES].expand_as(truth)


def test_greedy_nbp_frame_prediction_beats_copy_last(demo, clips):
    """The generator models motion: on these 4 clips it scores 22.0 dB vs 20.3 dB for
    repeating the last given frame (64 clips: 22.65 vs 20.30, MODEL_CARD.md)."""
    pred, truth, copy_last = _prediction_and_baseline(demo, clips)
    assert metrics.psnr(pred, truth) > metrics.psnr(copy_last, truth) + 1.0


def test_greedy_nbp_frame_prediction_follows_its_own_clip(demo, clips):
    """The prediction depends on the given frames: it is closer to its own clip's true
    continuation than to the other clips' continuations, by a clear margin."""
    pred, truth, _ = _prediction_and_baseline(demo, clips)
    own = metrics.psnr_per_frame(pred, truth).mean()
    others = [metrics.psnr_per_frame(pred, truth.roll(k, dims=0)).mean() for k in (1, 2, 3)]
    assert own > max(others) + 2.0


def test_class_conditional_generation_is_seeded(demo):
    gen = FastGenerator(demo.nbp, demo.tokenizer, device="cpu")
    a = generate_class(gen, [0, 5], generator=torch.Generator().manual_seed(1))
    b = generate_class(gen, [0, 5], generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, 17, 16, 16) and torch.equal(a, b)
    assert 0 <= float(a.min()) and float(a.max()) <= 1


def test_heldout_clips_never_use_the_training_seed():
    assert EVAL_SEED != TRAIN_SEED
    with pytest.raises(ValueError, match="training seed"):
        heldout_clips(2, seed=TRAIN_SEED)


def test_bad_inputs(demo, clips, tmp_path):
    video, labels = clips
    gen = FastGenerator(demo.nbp, demo.tokenizer, device="cpu")
    with pytest.raises(ValueError, match="class_ids"):
        condition_ids(demo.nbp, [12])
    with pytest.raises(ValueError, match="num_cond_frames"):
        predict_frames(gen, video, labels, num_cond_frames=4)
    with pytest.raises(ValueError, match="class_ids"):
        predict_frames(gen, video, labels[:2])
    with pytest.raises(FileNotFoundError, match="demo models"):
        load_demo(tmp_path)


def test_nbp_eval_prints_one_json_line(capsys):
    from nbp.cli import main

    assert main(["eval", "--model", "demo", "--num-clips", "2", "--repeats", "0", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    for key in ("recon_psnr", "pred_psnr_nbp", "pred_psnr_ntp", "pred_psnr_copy_last", "recon_ssim",
                "pred_ssim_nbp", "pred_ssim_ntp", "pred_ssim_copy_last", "fps_nbp", "fps_ntp",
                "fps1_nbp", "fps1_ntp", "speedup1_nbp_over_ntp"):
        assert isinstance(res[key], float) and math.isfinite(res[key]), key
    assert res["seed"] == EVAL_SEED and res["steps_nbp"] * 8 == res["steps_ntp"] == 384
    assert res["recon_psnr"] > RECON_PSNR_FLOOR and res["tokenizer_dtype"] == "float32"


def test_nbp_generate_demo_class_and_prediction(tmp_path, capsys):
    import imageio.v3 as iio

    from nbp.cli import main

    out = tmp_path / "class.gif"
    assert main(["generate", "--out", str(out), "--class-id", "7", "--batch", "2", "--scale", "2"]) == 0
    assert iio.imread(out, index=None).shape[:3] == (17, 32, 64)   # 17 frames, 2 x (16x16 x2)
    text = capsys.readouterr().out
    assert "demo model" in text and "72 steps" in text and " s (" in text   # 9x8x8 codes / L = 8
    out = tmp_path / "pred.gif"
    assert main(["generate", "--out", str(out), "--predict", "--greedy"]) == 0
    assert iio.imread(out, index=None).shape[:3] == (17, 16, 16)
    assert "48 steps" in capsys.readouterr().out                    # 384 predicted codes / L = 8


@pytest.mark.parametrize("argv, match", [(["--predict", "--random"], "--predict"),
                                         (["--scale", "0"], "--scale")])
def test_nbp_generate_demo_bad_arguments(tmp_path, capsys, argv, match):
    from nbp.cli import main

    out = tmp_path / "x.gif"
    assert main(["generate", "--out", str(out)] + argv) == 2
    assert match in capsys.readouterr().err and not out.exists()
