"""nbp train transformer on windows of longer clips (crop_frames) and from a model's weights (init)."""
import json

import pytest
import torch
from safetensors.torch import save_file

from nbp import NBPTransformer, TransformerConfig
from nbp.data import TokenDataset, crop_windows, window_starts
from nbp.train import LoopConfig, OptimConfig, TransformerTrainConfig, train_transformer
from nbp.train.transformer import _check_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

T_LONG, T, H, W, CODES = 7, 3, 2, 2, 16


def _cfg(t: int = T, **over) -> TransformerConfig:
    d = {"latent_shape": (t, H, W), "block_shape": (1, 1, 2), "n_layer": 1, "n_embd": 32,
         "n_head": 2, "bov": True, "cond_len": 1, "cond_vocab_size": 4, "codebook_size": CODES,
         "vocab_size": 1 + 4 + CODES}
    return TransformerConfig.from_preset("tiny", **{**d, **over})


@pytest.fixture(scope="module")
def long_cache(tmp_path_factory):
    """24 clips of T_LONG latent frames whose codes name their frame: codes[n, f] == f (mod CODES)
    plus the clip's index, so a window's content tells where it was cut."""
    path = tmp_path_factory.mktemp("tokens") / "long.safetensors"
    n = torch.arange(24)[:, None, None, None]
    f = torch.arange(T_LONG)[None, :, None, None]
    codes = ((f + n) % CODES).expand(24, T_LONG, H, W).to(torch.int32).contiguous()
    meta = {"latent_shape": [T_LONG, H, W], "codebook_size": CODES}
    save_file({"codes": codes, "labels": torch.arange(24) % 4}, str(path),
              metadata={"nbp_tokens": json.dumps(meta)})
    return path


def _loop(steps=2, lr=1e-3, **over):
    return LoopConfig(steps=steps, global_batch=4, log_every=1, progress=False,
                      optim=OptimConfig(lr=lr), **over)


def test_window_starts_draw_clip_starts_and_mid_clip_windows():
    starts = window_starts(5, 4000, 33, 9, start_prob=0.25, seed=0)
    assert starts.shape == (4000,) and starts.dtype == torch.int64
    assert int(starts.min()) == 0 and int(starts.max()) == 33 - 9
    assert set(starts.tolist()) == set(range(33 - 9 + 1))            # every start that fits
    share = float((starts == 0).double().mean())
    # 0.25 at the start plus 0.75 / 24 of the mid-clip draws that never pick 0
    assert 0.21 < share < 0.29, share
    assert float((window_starts(5, 4000, 33, 9, start_prob=0.0, seed=0) == 0).double().mean()) == 0
    assert bool((window_starts(5, 64, 33, 9, start_prob=1.0, seed=0) == 0).all())
    assert bool((window_starts(5, 16, 9, 9, start_prob=0.0, seed=0) == 0).all())  # only one fits


def test_window_starts_are_a_function_of_seed_and_step():
    a = window_starts(7, 64, 33, 9, start_prob=0.25, seed=3)
    assert torch.equal(a, window_starts(7, 64, 33, 9, start_prob=0.25, seed=3))
    assert not torch.equal(a, window_starts(8, 64, 33, 9, start_prob=0.25, seed=3))
    assert not torch.equal(a, window_starts(7, 64, 33, 9, start_prob=0.25, seed=4))


@pytest.mark.parametrize("kw, match", [({"window": 10}, "window"), ({"window": 0}, "window"),
                                       ({"start_prob": 1.5}, "start_prob"),
                                       ({"start_prob": -0.1}, "start_prob")])
def test_window_starts_bad_arguments(kw, match):
    args = {"window": 9, "start_prob": 0.25, **kw}
    with pytest.raises(ValueError, match=match):
        window_starts(0, 4, 9, args["window"], start_prob=args["start_prob"], seed=0)


def test_crop_windows_cut_each_clip_at_its_start():
    codes = torch.arange(3 * 6 * 2 * 2).reshape(3, 6, 2, 2)
    starts = torch.tensor([0, 3, 1])
    out = crop_windows(codes, starts, 3)
    assert out.shape == (3, 3, 2, 2)
    for b, s in enumerate(starts.tolist()):
        assert torch.equal(out[b], codes[b, s:s + 3])
    with pytest.raises(ValueError, match="starts"):
        crop_windows(codes, torch.tensor([0, 4, 1]), 3)
    with pytest.raises(ValueError, match="starts"):
        crop_windows(codes, torch.tensor([0, 1]), 3)


def test_check_tokens_accepts_a_long_cache_only_when_cropping(long_cache):
    data = TokenDataset(long_cache)
    _check_tokens(data, _cfg(), crop_frames=T)
    with pytest.raises(ValueError, match="--crop-frames 3"):
        _check_tokens(data, _cfg())
    with pytest.raises(ValueError, match="at least 8 latent frames"):
        _check_tokens(data, _cfg(t=8), crop_frames=8)
    with pytest.raises(ValueError, match="crop_frames: windows must have the model's latent length"):
        TransformerTrainConfig(model=_cfg(), out_dir="unused", crop_frames=4)
    with pytest.raises(ValueError, match="crop_start_prob"):
        TransformerTrainConfig(model=_cfg(), out_dir="unused", crop_frames=T, crop_start_prob=2.0)


def test_training_on_windows_is_deterministic(long_cache, tmp_path, monkeypatch):
    """Every step trains on windows of consecutive latent frames of one clip, the same ones
    on a rerun with the same seed."""
    import nbp.train.transformer as tr

    seen = []
    real = tr.build_sequences
    monkeypatch.setattr(tr, "build_sequences",
                        lambda codes, cond, cfg: seen.append(codes.clone()) or real(codes, cond, cfg))
    data = TokenDataset(long_cache)
    run = TransformerTrainConfig(model=_cfg(), out_dir=str(tmp_path / "a"), crop_frames=T,
                                 crop_start_prob=0.25, loop=_loop(steps=6, seed=1))
    train_transformer(run, data)
    windows = seen[-6:]
    assert all(w.shape == (4, T, H, W) for w in windows)
    for w in windows:                                               # consecutive frames of one clip
        assert torch.equal((w[:, 1:] - w[:, :-1]) % CODES, torch.ones_like(w[:, 1:]))
    first = [w.clone() for w in windows]
    seen.clear()
    train_transformer(TransformerTrainConfig(model=_cfg(), out_dir=str(tmp_path / "b"), crop_frames=T,
                                             crop_start_prob=0.25, loop=_loop(steps=6, seed=1)), data)
    assert all(torch.equal(a, b) for a, b in zip(first, seen[-6:], strict=True))


def test_crop_windows_match_window_starts_in_training(long_cache, tmp_path, monkeypatch):
    import nbp.train.transformer as tr
    from nbp.data import tokens

    assert "crop_windows" not in vars(tr)   # looked up in nbp.data.tokens when training starts
    captured = {}

    orig = tokens.crop_windows

    def spy(codes, starts, window):
        captured.setdefault("starts", []).append(starts.clone())
        return orig(codes, starts, window)
    monkeypatch.setattr(tokens, "crop_windows", spy)
    run = TransformerTrainConfig(model=_cfg(), out_dir=str(tmp_path), crop_frames=T,
                                 crop_start_prob=0.25, loop=_loop(steps=8, seed=2))
    train_transformer(run, TokenDataset(long_cache))
    assert len(captured["starts"]) == 8
    for step, got in enumerate(captured["starts"]):
        assert torch.equal(got, window_starts(step, 4, T_LONG, T, start_prob=0.25, seed=2))
    drawn = torch.cat(captured["starts"])
    assert bool((drawn == 0).any()) and bool((drawn > 0).any())   # clip starts and mid-clip


def test_init_starts_from_the_given_weights(long_cache, tmp_path):
    torch.manual_seed(5)
    source = NBPTransformer(_cfg())
    source.save_pretrained(tmp_path / "src")
    run = TransformerTrainConfig(model=_cfg(), out_dir=str(tmp_path / "ft"), crop_frames=T,
                                 init=str(tmp_path / "src"), loop=_loop(steps=1, lr=1e-9))
    model = train_transformer(run, TokenDataset(long_cache))
    for k, v in source.state_dict().items():     # one step of lr 1e-9 moves a weight ~1e-9
        assert torch.allclose(model.state_dict()[k], v, rtol=0, atol=1e-7), k
    fresh = train_transformer(TransformerTrainConfig(model=_cfg(), out_dir=str(tmp_path / "fresh"),
                                                     crop_frames=T, loop=_loop(steps=1, lr=1e-9)),
                              TokenDataset(long_cache))
    assert not torch.equal(fresh.state_dict()["tok_emb.weight"], source.state_dict()["tok_emb.weight"])


def test_init_refuses_another_config_or_a_missing_dir(long_cache, tmp_path):
    NBPTransformer(_cfg(n_embd=64)).save_pretrained(tmp_path / "wide")
    out = tmp_path / "ft"
    run = TransformerTrainConfig(model=_cfg(), out_dir=str(out), crop_frames=T,
                                 init=str(tmp_path / "wide"), loop=_loop())
    with pytest.raises(ValueError, match=r"init: .* n_embd 64 \(here 32\)"):
        train_transformer(run, TokenDataset(long_cache))
    run.init = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="init: .* not a native model dir"):
        train_transformer(run, TokenDataset(long_cache))
    assert not out.exists()


def test_cli_finetunes_on_windows_from_init(long_cache, tmp_path, capsys):
    from nbp.cli import main

    flags = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-shape", "1", "1", "2",
             "--classes", "4", "--batch", "4", "--no-progress", "--log-every", "1"]
    rc = main(["train", "transformer", "--tokens", str(long_cache), "--out", str(tmp_path / "base"),
               "--steps", "1", "--crop-frames", str(T), *flags])
    assert rc == 0
    base = NBPTransformer.from_pretrained(tmp_path / "base" / "model")
    assert base.config.latent_shape == (T, H, W)
    rc = main(["train", "transformer", "--tokens", str(long_cache), "--out", str(tmp_path / "ft"),
               "--steps", "2", "--crop-frames", str(T), "--crop-start-prob", "0.5",
               "--init", str(tmp_path / "base" / "model"), *flags])
    assert rc == 0
    saved = json.loads((tmp_path / "ft" / "train_config.json").read_text())
    assert saved["crop_frames"] == T and saved["crop_start_prob"] == 0.5
    assert saved["init"] == str(tmp_path / "base" / "model")
    rc = main(["train", "transformer", "--tokens", str(long_cache), "--out", str(tmp_path / "bad"),
               "--steps", "1", "--init", str(tmp_path / "base" / "model"), *flags])
    assert rc == 2 and "latent_shape" in capsys.readouterr().err   # whole clips: t=7 here, 3 there
    rc = main(["train", "transformer", "--tokens", str(long_cache), "--out", str(tmp_path / "bad"),
               "--steps", "1", "--crop-frames", "8", *flags])
    assert rc == 2 and "--crop-frames: expected 1..7" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
