"""Loaders: published checkpoint layouts built from our own modules, native dirs, clear errors."""
import argparse
import dataclasses
import fractions
import pickle
import warnings

import pytest
import torch

from nbp import (TRANSFORMER_PRESETS, LoadError, NBPTransformer, TokenizerConfig, TransformerConfig,
                 VideoTokenizer, load_tokenizer, load_transformer)
from nbp.native import save_native
from nbp.published import transformer_config_from_published


def _published_args(**overrides) -> argparse.Namespace:
    """Flags as transformer_train.py records them (K600 script: unconditional frame prediction)."""
    args = dict(tokenizer="magvit2", vtokens=False, vtokens_pos=False, unconditional=True,
                cond_stage_key="label", class_cond_dim=None, cond_token_num=0, vocab_size=64000,
                first_stage_vocab_size=16384, block_size=96, n_layer=2, n_head=2, n_embd=16,
                n_unmasked=0, transformer_dropout=0.1, semi_ar=True, token_number_per_step=4,
                starts_with_bov=False, hybrid=False, sequence_length=17, resolution=32,
                p_drop_cond=None, base_lr=1e-3, batch_size=2)
    args.update(overrides)
    return argparse.Namespace(**args)


UCF_TEXT = dict(unconditional=False, cond_stage_key="text", starts_with_bov=True, hybrid=True,
                cond_token_num=8)
LABEL = dict(unconditional=False, cond_stage_key="label", class_cond_dim=5, cond_token_num=1)


def _random_model(cfg: TransformerConfig, seed=0) -> NBPTransformer:
    torch.manual_seed(seed)
    model = NBPTransformer(cfg)
    with torch.no_grad():  # make every tensor distinctive (norms, biases, position table, buffer)
        for t in model.state_dict().values():
            t.copy_(torch.randn_like(t) * 0.1 + (1.0 if t.dim() == 1 else 0.0))
    return model.eval()


def _write_ckpt(model, path, args=None, prefix="", junk=True):
    sd = {prefix + "transformer." + k: v.clone() for k, v in model.state_dict().items()}
    if junk:
        sd[prefix + "first_stage_model.encoder_layers.0.conv.weight"] = torch.randn(4, 3, 3, 3, 3)
        sd[prefix + "first_stage_model.decoder_layers.3.fn.1.beta"] = torch.randn(1, 4, 1, 1, 1)
    ckpt = {"epoch": 7, "global_step": 1000, "pytorch-lightning_version": "1.5.10", "state_dict": sd}
    if args is not None:
        ckpt["hyper_parameters"] = {"args": args, "ckpt_path": None, "ignore_keys": ["mask"],
                                    "first_stage_key": "video", "cond_stage_key": args.cond_stage_key,
                                    "pkeep": 1.0, "bov_token": 0}
    torch.save(ckpt, path)
    return path


def _assert_same(model, loaded, cfg=None):
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype and torch.equal(sd[k], sd2[k]), k
    if cfg is not None:
        assert loaded.config == cfg
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def _cfg(**kw):
    base = dict(vocab_size=64000, n_layer=2, n_head=2, n_embd=16, max_seq_len=96, latent_shape=(5, 4, 4),
                block_shape=(1, 1, 4), dropout=0.1)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_unconditional_lightning_ckpt(tmp_path, prefix):
    cfg = _cfg()
    model = _random_model(cfg)
    path = _write_ckpt(model, tmp_path / "k600.ckpt", _published_args(), prefix=prefix)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the Namespace loads without falling back to full unpickling
        loaded = load_transformer(path)
    assert not loaded.training
    _assert_same(model, loaded, cfg)


@pytest.mark.parametrize("fps, want", [(8, 8.0), (12.5, 12.5), (None, None), (0, None),
                                       (True, None), ("8", None)])
def test_training_flags_kept_and_fps_read(tmp_path, fps, want):
    """The flags of a .ckpt stay on the model (read once); training_fps accepts only a positive
    number; a native or flag-less model has none."""
    from nbp.published import training_fps

    args = _published_args()
    if fps is None:
        vars(args).pop("fps", None)
    else:
        args.fps = fps
    loaded = load_transformer(_write_ckpt(_random_model(_cfg()), tmp_path / "a.ckpt", args))
    assert loaded.training_flags["n_layer"] == args.n_layer
    assert training_fps(loaded) == want
    assert training_fps(_random_model(_cfg())) is None


def test_hybrid_text_ckpt(tmp_path):
    # T = V - 64000 - L text ids (10 here), as in the UCF layout.
    cfg = _cfg(vocab_size=64000 + 10 + 4, hybrid=True, bov=True, cond_len=8, cond_vocab_size=10)
    model = _random_model(cfg, seed=1)
    path = _write_ckpt(model, tmp_path / "ucf.ckpt", _published_args(**UCF_TEXT), prefix="module.")
    loaded = load_transformer(path)
    _assert_same(model, loaded, cfg)
    assert (loaded.config.cond_offset, loaded.config.video_offset) == (4, 14)


@pytest.mark.parametrize("bov", [False, True])
def test_class_label_ckpt(tmp_path, bov):
    # One special id in the vocabulary either way (published n_spe_tokens = 1).
    cfg = _cfg(vocab_size=64000 + 5 + 1, bov=bov, cond_len=1, cond_vocab_size=5)
    model = _random_model(cfg, seed=2)
    path = _write_ckpt(model, tmp_path / "cls.ckpt", _published_args(**LABEL, starts_with_bov=bov))
    _assert_same(model, load_transformer(path), cfg)


def test_missing_flags_inferred_from_tensors(tmp_path):
    cfg = _cfg()
    model = _random_model(cfg)
    args = _published_args()
    for name in ("n_layer", "n_embd", "block_size", "transformer_dropout"):
        delattr(args, name)
    loaded = load_transformer(_write_ckpt(model, tmp_path / "a.ckpt", args))
    _assert_same(model, loaded, dataclasses.replace(cfg, dropout=0.0))


def test_missing_n_head_needs_preset(tmp_path):
    args = _published_args()
    del args.n_head
    path = _write_ckpt(_random_model(_cfg()), tmp_path / "a.ckpt", args)
    with pytest.raises(LoadError, match="'n_head' is missing .* pass preset="):
        load_transformer(path)


@pytest.mark.parametrize("preset", ["tiny", "tiny-hybrid"])
def test_no_hyper_parameters_with_preset(tmp_path, preset):
    cfg = TRANSFORMER_PRESETS[preset]
    model = _random_model(cfg, seed=3)
    path = _write_ckpt(model, tmp_path / "ds.ckpt", None, prefix="module.")
    with pytest.raises(LoadError, match="no hyper_parameters.*pass preset="):
        load_transformer(path)
    _assert_same(model, load_transformer(path, preset=preset), cfg)
    other = "tiny-hybrid" if preset == "tiny" else "tiny"
    with pytest.raises(LoadError, match="vocab_size: .* per preset .* but the weights have .*tok_emb.weight rows"):
        load_transformer(path, preset=other)


def test_bare_state_dict_and_mask_keys(tmp_path):
    model = _random_model(TRANSFORMER_PRESETS["tiny"])
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.blocks.0.attn.mask"] = torch.ones(1, 1, 8, 8)  # old GPT buffer, dropped as published
    torch.save(sd, tmp_path / "bare.pt")
    _assert_same(model, load_transformer(tmp_path / "bare.pt", preset="tiny"))


def _ckpt_with(tmp_path, edit):
    model = _random_model(_cfg())
    path = _write_ckpt(model, tmp_path / "bad.ckpt", _published_args())
    ckpt = torch.load(path, weights_only=False)
    edit(ckpt["state_dict"], ckpt)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda sd, c: sd.update({"transformer.blocks.0.attn.rope": torch.ones(3)}),
     r"unknown tensors: blocks\.0\.attn\.rope"),
    (lambda sd, c: sd.pop("transformer.ln_f.weight"), r"missing tensors: ln_f\.weight"),
    (lambda sd, c: sd.update({"transformer.blocks.1.mlp.0.weight": torch.ones(64, 15)}),
     r"wrong shapes: blocks\.1\.mlp\.0\.weight: found \(64, 15\), expected \(64, 16\)"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "n_layer", 3),
     r"n_layer: 3 per the training flags, but the weights have 2"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "n_embd", 32),
     r"n_embd: 32 per the training flags, but the weights have 16"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "cond_token_num", 2),
     r"cond_len: 2 per the training flags, but the weights have 0 \(uncond_embedding rows\)"),
    (lambda sd, c: sd.update({"transformer.blocks.0.ln1.weight": torch.ones(16, dtype=torch.int64)}),
     r"non-float tensors: blocks\.0\.ln1\.weight"),
    (lambda sd, c: [sd.pop(k) for k in [k for k in sd if k.startswith("transformer.")]],
     r"no generator weights; expected keys under 'transformer\.'"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "token_number_per_step", 3),
     r"invalid configuration .*block_shape"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "hybrid", True),
     r"unconditional with hybrid"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "sequence_length", 16),
     r"sequence_length/resolution do not fit .*T = 1 \+ 4k"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "n_layer", 2.5),
     r"training flag in hyper_parameters\['args'\]: n_layer: expected an int, got 2\.5"),
    (lambda sd, c: setattr(c["hyper_parameters"]["args"], "hybrid", "no"),
     r"training flag in hyper_parameters\['args'\]: hybrid: expected true or false"),
])
def test_inconsistent_files_raise(tmp_path, edit, match):
    path = _ckpt_with(tmp_path, edit)
    with pytest.raises(LoadError, match=match):
        load_transformer(path)


def test_label_vocab_mismatch(tmp_path):
    cfg = _cfg(vocab_size=64000 + 5 + 1, cond_len=1, cond_vocab_size=5)
    path = _write_ckpt(_random_model(cfg), tmp_path / "cls.ckpt", _published_args(**{**LABEL, "class_cond_dim": 6}))
    with pytest.raises(LoadError, match=r"vocab_size: 64007 per the training flags, but the weights have 64006"):
        load_transformer(path)


def test_preset_must_agree_with_flags(tmp_path):
    path = _write_ckpt(_random_model(_cfg()), tmp_path / "a.ckpt", _published_args())
    with pytest.raises(LoadError, match=r"(?s)does not match preset 'k600-base'.*n_layer: 2 per the training flags"):
        load_transformer(path, preset="k600-base")
    with pytest.raises(LoadError, match="unknown preset 'k600'"):
        load_transformer(path, preset="k600")


def test_pickled_objects_need_trust(tmp_path):
    model = _random_model(_cfg())
    path = _write_ckpt(model, tmp_path / "a.ckpt", _published_args())
    ckpt = torch.load(path, weights_only=False)
    ckpt["callbacks"] = {"ModelCheckpoint": {"best_model_score": fractions.Fraction(1, 3)}}
    torch.save(ckpt, path)
    with pytest.raises(LoadError, match=r"refused to unpickle fractions\.Fraction.*trust_remote_code=True"):
        load_transformer(path)
    with pytest.warns(UserWarning, match="trust_remote_code=True.*weights_only=False"):
        _assert_same(model, load_transformer(path, trust_remote_code=True))


def test_device_dtype_and_unreadable_files(tmp_path):
    model = _random_model(_cfg())
    path = _write_ckpt(model, tmp_path / "a.ckpt", _published_args())
    loaded = load_transformer(path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.state_dict().values()} == {torch.bfloat16}
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight.to(torch.bfloat16))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(LoadError, match="not a readable torch checkpoint|cannot be read"):
        load_transformer(tmp_path / "junk.ckpt")
    with pytest.raises(LoadError, match="does not exist"):
        load_transformer(tmp_path / "missing.ckpt")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.ckpt")
    with pytest.raises(LoadError, match="expected a Lightning checkpoint with 'state_dict', found weights"):
        load_transformer(tmp_path / "odd.ckpt")


@pytest.mark.parametrize("preset,flags", [
    ("k600-base", dict(n_layer=24, n_head=16, n_embd=1536)),
    ("k600-3b", dict(n_layer=32, n_head=32, n_embd=3072)),
    ("ucf-base", dict(n_layer=24, n_head=16, n_embd=1536, **UCF_TEXT)),
    ("ucf-3b", dict(n_layer=32, n_head=32, n_embd=3072, **UCF_TEXT)),
])
def test_published_training_flags_give_the_presets(preset, flags):
    """The flags of scripts/lm_train/*.sh on full-size (meta) tensors map onto our presets."""
    with torch.device("meta"):
        tensors = NBPTransformer(TRANSFORMER_PRESETS[preset]).state_dict()
    args = vars(_published_args(block_size=5120, token_number_per_step=16, resolution=128, **flags))
    cfg = transformer_config_from_published(tensors, args)
    assert dataclasses.replace(cfg, dropout=0.0) == TRANSFORMER_PRESETS[preset]
    assert transformer_config_from_published(tensors, args, preset=preset) == cfg
    assert transformer_config_from_published(tensors, None, preset=preset) == TRANSFORMER_PRESETS[preset]


def test_native_transformer_round_trip(tmp_path):
    cfg = TRANSFORMER_PRESETS["tiny-hybrid"]
    model = _random_model(cfg)
    model.save_pretrained(tmp_path / "m")
    _assert_same(model, NBPTransformer.from_pretrained(tmp_path / "m"), cfg)
    _assert_same(model, load_transformer(tmp_path / "m"), cfg)
    load_transformer(tmp_path / "m", preset="tiny-hybrid")
    with pytest.raises(LoadError, match="does not match preset 'tiny'"):
        load_transformer(tmp_path / "m", preset="tiny")
    with pytest.raises(LoadError, match="holds a 'nbp-transformer' checkpoint, expected a 'nbp-tokenizer'"):
        load_tokenizer(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="expected a native checkpoint directory"):
        load_transformer(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="path: expected a directory"):
        model.save_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="module: expected a module with a class model_type tag"):
        save_native(torch.nn.Linear(2, 2), tmp_path / "lin")
    assert not (tmp_path / "lin").exists()


@pytest.fixture(scope="module")
def tiny_tokenizer():
    torch.manual_seed(4)
    tok = VideoTokenizer(TokenizerConfig.from_preset("tiny")).eval()
    with torch.no_grad():
        for t in tok.state_dict().values():
            t.add_(torch.randn_like(t) * 0.05)
    return tok


def _write_tokenizer_pt(tok, path, edit=None):
    sd = {"module." + k: v.clone() for k, v in tok.state_dict().items()}
    if edit:
        edit(sd)
    torch.save({"model_state_dict": sd, "version": "0.0.1", "config": pickle.dumps({"embed_dim": 3})}, path)
    return path


def test_published_tokenizer_file(tmp_path, tiny_tokenizer, assert_same_tokenizer):
    path = _write_tokenizer_pt(tiny_tokenizer, tmp_path / "magvit2_tiny.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_tokenizer(path, config="tiny")
    assert_same_tokenizer(tiny_tokenizer, loaded)
    # The default architecture is the released one: a tiny file does not fit it.
    with pytest.raises(LoadError, match=r"(?s)tokenizer\) does not match .*wrong shapes: encoder_layers\.0\.conv\.weight: "
                       r"found \(8, 3, 3, 3, 3\), expected \(128, 3, 3, 3, 3\)"):
        load_tokenizer(path)


def test_bad_tokenizer_files(tmp_path, tiny_tokenizer):
    path = _write_tokenizer_pt(tiny_tokenizer, tmp_path / "a.pt",
                               lambda sd: sd.update({"module.quantizers.implicit_codebook": torch.ones(64, 3)}))
    with pytest.raises(LoadError, match=r"unknown tensors: quantizers\.implicit_codebook"):
        load_tokenizer(path, config="tiny")
    path = _write_tokenizer_pt(tiny_tokenizer, tmp_path / "b.pt",
                               lambda sd: sd.pop("module.encoder_layers.1.fn.1.beta"))
    with pytest.raises(LoadError, match=r"missing tensors: encoder_layers\.1\.fn\.1\.beta"):
        load_tokenizer(path, config="tiny")
    torch.save({"model": 3}, tmp_path / "c.pt")
    with pytest.raises(LoadError, match="expected a tokenizer file with 'model_state_dict'"):
        load_tokenizer(tmp_path / "c.pt")
    torch.save({"model_state_dict": {"x": 1}}, tmp_path / "d.pt")
    with pytest.raises(LoadError, match="expected a state dict of named tensors"):
        load_tokenizer(tmp_path / "d.pt")


def test_native_tokenizer_via_loader(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.config == tiny_tokenizer.config
    sd, sd2 = tiny_tokenizer.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with pytest.raises(LoadError, match="expected a 'nbp-transformer'"):
        load_transformer(tmp_path / "tok")


def test_loaded_model_does_not_alias_the_file(tmp_path):
    model = _random_model(_cfg())
    path = _write_ckpt(model, tmp_path / "a.ckpt", _published_args())
    loaded = load_transformer(path)
    size = path.stat().st_size
    with open(path, "r+b") as fh:  # overwrite in place: a memory-mapped alias would see this
        fh.write(b"\0" * size)
    _assert_same(model, loaded)


def test_tokenizer_inside_generator_ckpt(tmp_path, tiny_tokenizer):
    model = _random_model(_cfg())
    path = _write_ckpt(model, tmp_path / "g.ckpt", _published_args(), prefix="module.", junk=False)
    with pytest.raises(LoadError, match="without tokenizer weights"):
        load_tokenizer(path, config="tiny")
    ckpt = torch.load(path, weights_only=False)
    ckpt["state_dict"].update({"module.first_stage_model." + k: v for k, v in tiny_tokenizer.state_dict().items()})
    torch.save(ckpt, path)
    loaded = load_tokenizer(path, config="tiny", dtype=torch.bfloat16)
    sd = tiny_tokenizer.state_dict()
    assert all(torch.equal(v, sd[k].to(torch.bfloat16)) for k, v in loaded.state_dict().items())
    assert loaded.encode(torch.rand(1, 3, 5, 8, 8)).dtype == torch.int64
    _assert_same(model, load_transformer(path))  # and the generator ignores the tokenizer keys


def test_loading_a_model_and_the_cli_stay_light():
    """Building a skeleton on the meta device runs no initialiser (those import torch's
    compiler stack, about a second), and building the CLI parser imports no training loop."""
    import subprocess
    import sys

    code = ("import sys; from nbp.cli import build_parser; build_parser(); "
            "from nbp.demo import load_demo; load_demo(); "
            "heavy = [m for m in ('torch._dynamo', 'nbp.train.loop') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
