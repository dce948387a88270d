"""Checkpoints: exact resume (bitwise on CPU), foreign checkpoints refused, nothing overwritten."""
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from nbp import TransformerConfig
from nbp.data import SyntheticVideos, TokenDataset
from nbp.tokenizer import TokenizerConfig
from nbp.train import (LoopConfig, OptimConfig, TokenizerTrainConfig, TransformerTrainConfig,
                       train_tokenizer, train_transformer)
from nbp.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


STEPS = 8


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (24, 3, 4, 4), generator=g)
    codes[:, 1:] = codes[:, :1]
    path = tmp_path_factory.mktemp("codes") / "codes.safetensors"
    save_file({"codes": codes.int(), "labels": torch.randint(0, 6, (24,), generator=g)}, str(path))
    return TokenDataset(path)


def model_cfg(**over):
    # dropout and condition dropout on: resuming must restore the RNG streams too
    return TransformerConfig.from_preset("tiny", bov=True, cond_len=1, cond_vocab_size=6,
                                         vocab_size=1 + 6 + 64, dropout=0.1, **over)


def run_cfg(out, stop_at=None, resume=None, lr=3e-3, **over):
    return TransformerTrainConfig(
        model=model_cfg(**over), out_dir=str(out), p_drop_cond=0.3,
        loop=LoopConfig(steps=STEPS, global_batch=4, log_every=1, ckpt_every=3, stop_at=stop_at,
                        resume=resume, progress=False,
                        optim=OptimConfig(lr=lr, warmup_steps=2, schedule="cosine")))


def _log(out):
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "steps_per_s")}
            for line in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_state(a, b):
    ca, cb = read_checkpoint(a / "checkpoint.pt"), read_checkpoint(b / "checkpoint.pt")
    assert ca["step"] == cb["step"] == STEPS
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    for pid, st in ca["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, cb["optimizer"]["state"][pid][k]), (pid, k)
    assert ca["scheduler"] == cb["scheduler"]
    assert torch.equal(ca["rng"][0]["torch"], cb["rng"][0]["torch"])


def test_transformer_resume_is_bitwise_exact(tokens, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train_transformer(run_cfg(one), tokens)
    train_transformer(run_cfg(two, stop_at=STEPS // 2), tokens)
    half = read_checkpoint(two / "checkpoint.pt")
    assert half["step"] == STEPS // 2
    # a loadable model is written with every checkpoint, so a stopped run leaves one
    from nbp import NBPTransformer

    stopped = NBPTransformer.from_pretrained(two / "model").state_dict()
    assert stopped.keys() == {k.removeprefix("model.") for k in half["model"]}
    for k, v in half["model"].items():
        assert torch.equal(stopped[k.removeprefix("model.")], v), k
    train_transformer(run_cfg(two, resume="auto"), tokens)
    _assert_same_state(one, two)
    assert _log(one) == _log(two)                            # losses, grad norms and lr, bitwise


def test_tokenizer_resume_is_bitwise_exact(tmp_path):
    data = SyntheticVideos(8, resolution=8, num_frames=5, seed=1)
    mcfg = TokenizerConfig(encoder_channels=(4, 4), encoder_units=(1, 1), decoder_channels=(4, 4),
                           decoder_units=(1, 1), strides=((2, 2, 2),), norm_groups=2,
                           fsq_levels=(3, 3))

    def cfg(out, **loop):
        return TokenizerTrainConfig(model=mcfg, out_dir=str(out), loss="l1+mse", loop=LoopConfig(
            steps=STEPS, global_batch=2, log_every=1, progress=False, optim=OptimConfig(lr=1e-2),
            **loop))

    train_tokenizer(cfg(tmp_path / "one"), data)
    train_tokenizer(cfg(tmp_path / "two", stop_at=3), data)
    train_tokenizer(cfg(tmp_path / "two", resume="auto"), data)
    _assert_same_state(tmp_path / "one", tmp_path / "two")
    assert _log(tmp_path / "one") == _log(tmp_path / "two")


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_from_another_config_is_refused_and_nothing_changes(tokens, tmp_path):
    out = tmp_path / "run"
    train_transformer(run_cfg(out, stop_at=3), tokens)
    before = {p.name: _digest(p) for p in out.iterdir() if p.is_file()}
    for bad in (dict(lr=1e-3), dict(n_embd=64), dict(block_shape=(1, 2, 2))):
        with pytest.raises(ValueError, match="another configuration"):
            train_transformer(run_cfg(out, resume="auto", **bad), tokens)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train_transformer(run_cfg(out), tokens)           # a fresh run must not overwrite it
    assert {p.name: _digest(p) for p in out.iterdir() if p.is_file()} == before


def test_resume_bad_files(tokens, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_transformer(run_cfg(tmp_path / "a", resume=str(tmp_path / "missing.pt")), tokens)
    junk = tmp_path / "junk.pt"
    torch.save({"weights": 1}, junk)
    with pytest.raises(ValueError, match="not an nbp training checkpoint"):
        train_transformer(run_cfg(tmp_path / "b", resume=str(junk)), tokens)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_token_cache_must_fit_the_model(tokens, tmp_path):
    with pytest.raises(ValueError, match="latent grid"):
        train_transformer(run_cfg(tmp_path / "c", latent_shape=(3, 4, 8)), tokens)
    with pytest.raises(ValueError, match="max_seq_len"):
        train_transformer(run_cfg(tmp_path / "c", max_seq_len=40), tokens)
    assert not (tmp_path / "c").exists()


def test_resuming_a_finished_run_changes_nothing(tokens, tmp_path, capsys):
    out = tmp_path / "done"
    train_transformer(run_cfg(out), tokens)

    def files():  # train_config.json records the latest invocation (resume included)
        return {p.relative_to(out): _digest(p) for p in out.rglob("*")
                if p.is_file() and p.name != "train_config.json"}

    before = files()
    train_transformer(run_cfg(out, resume="out_dir"), tokens)
    assert f"resumed from step {STEPS}" in capsys.readouterr().out
    assert files() == before


def test_sigint_under_torchrun_checkpoints_once_from_rank_0(tokens, tmp_path, capsys, interrupt_when_logged):
    """torchrun forwards Ctrl-C to each worker: all ranks stop at one step, rank 0 writes and
    prints the one line (torchrun adds its own report of the signal)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import nbp
    from nbp.cli import main

    out = tmp_path / "run"
    args = ["train", "transformer", "--tokens", str(tokens.path), "--out", str(out), "--steps", "3000",
            "--batch", "4", "--log-every", "1", "--ckpt-every", "1000", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(nbp.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "nbp.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    _, err = interrupt_when_logged(proc, out / "log.jsonl")
    stops = [ln for ln in err.splitlines() if ln.startswith("stopped at step")]
    assert len(stops) == 1, err[-3000:]
    step = int(stops[0].split()[3].rstrip(","))
    ckpt = read_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == step and ckpt["world_size"] == 2
    assert [r["step"] for r in _log(out)] == list(range(1, step + 1))   # one writer
    assert main([*args, "--resume", "--stop-at", str(step + 1)]) == 0
    assert f"resumed from step {step}" in capsys.readouterr().out
    assert read_checkpoint(out / "checkpoint.pt")["step"] == step + 1


def test_cli_resume_refusals_name_the_setting(tokens, tmp_path, capsys):
    from nbp.cli import main

    out = tmp_path / "run"
    args = ["train", "transformer", "--tokens", str(tokens.path), "--out", str(out), "--steps", "4",
            "--no-progress"]
    assert main([*args, "--stop-at", "1"]) == 0
    capsys.readouterr()
    assert main([*args, "--resume", "--n-embd", "64", "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another configuration" in err
    assert "model.n_embd: checkpoint 32 vs now 64" in err and "loop.optim.lr: checkpoint 0.0003" in err
