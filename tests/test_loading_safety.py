"""Loading never runs code from a file unless trust_remote_code is given.

Every malicious file here pickles an object whose unpickling calls
``open(marker, "w")`` (pickled as ``io.open``): the marker file exists afterwards exactly when
code from the file ran. The trusted loads are the positive control: they do
create the marker, so its absence elsewhere means something.
"""
import argparse
import collections
import fractions
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from nbp import LoadError, NBPTransformer, TokenizerConfig, TransformerConfig, VideoTokenizer
from nbp import load_tokenizer, load_transformer
from nbp.cli import main as cli_main
from nbp.published import SAFE_GLOBALS


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class NamespaceSubclass(argparse.Namespace):
    pass


# A small generator over the published tokenizer's 64000 codes (9 frames at 32x32 -> 3x4x4 codes).
CFG = TransformerConfig(vocab_size=64000, n_layer=2, n_head=2, n_embd=16, max_seq_len=64,
                        latent_shape=(3, 4, 4), block_shape=(1, 1, 4))


def _model() -> NBPTransformer:
    torch.manual_seed(0)
    return NBPTransformer(CFG).eval()


def _args(**over) -> argparse.Namespace:
    """The flags of a tiny unconditional run, as Lightning's hyper_parameters['args'] holds them."""
    flags = dict(tokenizer="magvit2", vtokens=False, vtokens_pos=False, unconditional=True,
                 cond_stage_key="label", class_cond_dim=None, cond_token_num=0, n_layer=2, n_head=2,
                 n_embd=16, block_size=64, token_number_per_step=4, starts_with_bov=False, hybrid=False,
                 transformer_dropout=0.0, sequence_length=9, resolution=32, vocab_size=64000)
    flags.update(over)
    return argparse.Namespace(**flags)


def _lightning(model, args, **extra) -> dict:
    """A checkpoint laid out as PyTorch Lightning 1.5 writes one (plain-typed trainer state)."""
    sd = {"transformer." + k: v.clone() for k, v in model.state_dict().items()}
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "1.5.4", "state_dict": sd,
            "callbacks": {"ModelCheckpoint{'monitor': 'val/loss', 'mode': 'min'}": {
                "monitor": "val/loss", "best_model_score": torch.tensor(0.25),
                "best_model_path": "/ckpt/best.ckpt", "current_score": torch.tensor(0.3),
                "dirpath": "/ckpt", "best_k_models": {"/ckpt/best.ckpt": torch.tensor(0.25)}}},
            "optimizer_states": [{"state": {0: {"step": torch.tensor(120.0),
                                                "exp_avg": torch.zeros(3)}},
                                  "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                                    "weight_decay": 0.01, "amsgrad": False,
                                                    "foreach": None, "params": [0]}]}],
            "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 120, "_last_lr": [1e-4],
                               "lr_lambdas": [None]}],
            "loops": collections.OrderedDict(fit_loop={"state_dict": {}, "epoch_progress": {
                "total": {"ready": 3, "completed": 3}}}),
            "hparams_name": "kwargs",
            "hyper_parameters": {"args": args, "ckpt_path": None, "ignore_keys": ["mask"],
                                 "first_stage_key": "video", "cond_stage_key": "label"},
            **extra}


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_published_layout_loads_without_any_flag(tmp_path):
    model = _model()
    torch.save(_lightning(model, _args()), tmp_path / "pub.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning: the safe read suffices
        loaded = load_transformer(tmp_path / "pub.ckpt")
    _same(model, loaded)
    assert loaded.config == CFG


@pytest.mark.parametrize("case,culprit", [("namespace subclass", "NamespaceSubclass"),
                                          ("numpy scalar", "numpy"),
                                          ("Fraction", r"fractions\.Fraction")])
def test_allow_list_is_exactly_namespace(tmp_path, case, culprit):
    assert SAFE_GLOBALS == (argparse.Namespace,)
    if case == "namespace subclass":
        ckpt = _lightning(_model(), NamespaceSubclass(**vars(_args())))
    else:
        extra = np.float64(0.25) if case == "numpy scalar" else fractions.Fraction(1, 3)
        ckpt = _lightning(_model(), _args(), extra=extra)
    torch.save(ckpt, tmp_path / "a.ckpt")
    with pytest.raises(LoadError, match=rf"refused to unpickle \S*{culprit}.*trust_remote_code=True"):
        load_transformer(tmp_path / "a.ckpt")


@pytest.mark.parametrize("where", ["callbacks", "hyper_parameters", "state_dict", "whole file"])
def test_api_refuses_code_in_a_generator_ckpt(tmp_path, where):
    marker = tmp_path / "ran"
    ckpt = _lightning(_model(), _args())
    if where == "whole file":
        ckpt = Payload(marker)
    elif where == "state_dict":
        ckpt["state_dict"]["transformer.evil"] = Payload(marker)
    elif where == "hyper_parameters":
        ckpt["hyper_parameters"]["args"].evil = Payload(marker)
    else:
        ckpt["callbacks"]["Evil"] = {"state": Payload(marker)}
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(LoadError, match=r"refused to unpickle io\.open"):
        load_transformer(tmp_path / "evil.ckpt")
    assert not marker.exists()
    with pytest.raises(LoadError, match=r"refused to unpickle io\.open"):
        load_transformer(tmp_path / "evil.ckpt", preset="k600-base")
    assert not marker.exists()


def test_trust_remote_code_is_the_only_way_to_unpickle(tmp_path):
    marker = tmp_path / "ran"
    model = _model()
    torch.save(_lightning(model, _args(), callbacks={"Evil": Payload(marker)}), tmp_path / "evil.ckpt")
    with pytest.raises(LoadError):
        load_transformer(tmp_path / "evil.ckpt", trust_remote_code=False)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="trust_remote_code=True"):
        _same(model, load_transformer(tmp_path / "evil.ckpt", trust_remote_code=True))
    assert marker.exists()  # the opt-in really unpickles: the marker test can fail


def _tokenizer() -> VideoTokenizer:
    torch.manual_seed(1)
    return VideoTokenizer(TokenizerConfig.from_preset("tiny")).eval()


def test_api_refuses_code_in_a_tokenizer_pt(tmp_path):
    marker = tmp_path / "ran"
    tok = _tokenizer()
    sd = {"module." + k: v for k, v in tok.state_dict().items()}
    torch.save({"model_state_dict": sd, "version": "0.0.1", "config": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(LoadError, match=r"refused to unpickle io\.open"):
        load_tokenizer(tmp_path / "evil.pt", config="tiny")
    assert not marker.exists()
    with pytest.warns(UserWarning):
        _same(tok, load_tokenizer(tmp_path / "evil.pt", config="tiny", trust_remote_code=True))
    assert marker.exists()


def test_native_dirs_never_unpickle(tmp_path):
    marker = tmp_path / "ran"
    _model().save_pretrained(tmp_path / "m")
    torch.save({"w": Payload(marker)}, tmp_path / "m" / "model.safetensors")  # a pickle in disguise
    with pytest.raises(LoadError, match="not a readable safetensors file"):
        load_transformer(tmp_path / "m", trust_remote_code=True)
    assert not marker.exists()


def _generate_args(tmp_path, model, tokenizer):
    return ["generate", "--model", str(model), "--tokenizer", str(tokenizer),
            "--out", str(tmp_path / "x.gif"), "--greedy"]


def test_cli_generate_refuses_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save(_lightning(_model(), _args(), callbacks={"Evil": Payload(marker)}), tmp_path / "evil.ckpt")
    _tokenizer().save_pretrained(tmp_path / "tok")
    assert cli_main(_generate_args(tmp_path, tmp_path / "evil.ckpt", tmp_path / "tok")) == 2
    assert "refused to unpickle io.open" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "x.gif").exists()

    _model().save_pretrained(tmp_path / "good")
    sd = {"module." + k: v for k, v in _tokenizer().state_dict().items()}
    torch.save({"model_state_dict": sd, "config": Payload(marker)}, tmp_path / "evil.pt")
    assert cli_main(_generate_args(tmp_path, tmp_path / "good", tmp_path / "evil.pt")) == 2
    assert not marker.exists() and not (tmp_path / "x.gif").exists()


def test_cli_generate_subprocess_refuses_code(tmp_path):
    """The installed entry point, in a fresh interpreter (nothing imported by the test runs first)."""
    marker = tmp_path / "ran"
    torch.save(Payload(marker), tmp_path / "evil.ckpt")
    _tokenizer().save_pretrained(tmp_path / "tok")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    res = subprocess.run([sys.executable, "-m", "nbp.cli",
                          *_generate_args(tmp_path, tmp_path / "evil.ckpt", tmp_path / "tok")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 2, res.stderr
    assert "refused to unpickle io.open" in res.stderr
    assert not marker.exists() and not (tmp_path / "x.gif").exists()


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_cli_eval_refuses_code(tmp_path, capsys):
    marker = tmp_path / "ran"
    root = tmp_path / "models"
    _tokenizer().save_pretrained(root / "tokenizer")
    for name in ("nbp", "ntp"):
        _model().save_pretrained(root / name)
    torch.save({"w": Payload(marker)}, root / "nbp" / "model.safetensors")
    rc = cli_main(["eval", "--model", str(root), "--num-clips", "1", "--trust-remote-code"])
    assert rc == 2 and "not a readable safetensors file" in capsys.readouterr().err
    assert not marker.exists()

    torch.save(Payload(marker), tmp_path / "i3d.pt")  # an I3D "TorchScript" file that is a pickle
    rc = cli_main(["eval", "--num-clips", "1", "--i3d", str(tmp_path / "i3d.pt")])
    assert rc == 2 and "nbp eval: error: PytorchStreamReader" in capsys.readouterr().err
    assert not marker.exists()
