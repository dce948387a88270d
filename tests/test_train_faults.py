"""Training files survive crashes, full disks and planted checkpoints (issue 18, items 1 and 4).

Each case is reproduced, then shown refused or handled: a pickle planted as
``checkpoint.pt`` runs no code on ``--resume``; SIGKILL during a checkpoint
write resumes exactly and its temporary file is cleaned; a torn ``log.jsonl``
line does not block a resume; a full disk (a 1 MiB tmpfs, or a simulated
ENOSPC) gives one line naming the file.
"""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import nbp
from nbp import TransformerConfig
from nbp.cli import main
from nbp.data import TokenDataset
from nbp.train import LoopConfig, OptimConfig, TransformerTrainConfig, train_transformer
from nbp.train.checkpoint import WriteError
from nbp.train.run_files import append_log

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
PACKAGE_ROOT = str(Path(nbp.__file__).resolve().parents[1])  # the child imports this nbp


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (12, 3, 4, 4), generator=g)
    path = tmp_path_factory.mktemp("codes") / "codes.safetensors"
    save_file({"codes": codes.int(), "labels": torch.randint(0, 6, (12,), generator=g)}, str(path))
    return path


def run_cfg(out, **loop):
    model = TransformerConfig.from_preset("tiny", latent_shape=(3, 4, 4), bov=True, cond_len=1,
                                          cond_vocab_size=6, vocab_size=1 + 6 + 64, dropout=0.1)
    loop = {"steps": STEPS, "global_batch": 4, "log_every": 1, "ckpt_every": 2, "progress": False,
            "optim": OptimConfig(lr=3e-3), **loop}
    return TransformerTrainConfig(model=model, out_dir=str(out), p_drop_cond=0.2, loop=LoopConfig(**loop))


def losses(out):
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"])
            for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    model = train_transformer(run_cfg(out), TokenDataset(tokens))
    return losses(out), model.state_dict()


def assert_same_run(out, reference):
    log, state = reference
    assert losses(out) == log
    from nbp.loading import transformer_from_pretrained

    for k, v in transformer_from_pretrained(out / "model").state_dict().items():
        assert torch.equal(v, state[k]), k


class Planted:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_checkpoint_runs_no_code_on_resume(tokens, tmp_path, capsys):
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Planted(live)))             # the payload does run when unpickled
    assert live.exists()
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    torch.save({"format": "nbp-train-checkpoint-v1", "step": 1, "x": Planted(marker)},
               out / "checkpoint.pt")
    rc = main(["train", "transformer", "--tokens", str(tokens), "--out", str(out), "--resume",
               "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert "not an nbp training checkpoint" in err and "posix.system" in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]   # nothing written


def test_checkpoints_hold_only_tensors_and_plain_data(tokens, reference, tmp_path):
    out = tmp_path / "run"
    train_transformer(run_cfg(out, stop_at=2), TokenDataset(tokens))
    path = out / "checkpoint.pt"
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    ckpt = torch.load(path, weights_only=True)                  # no allow-list needed
    # a file from before the numpy RNG state was stored as a tensor still resumes exactly
    import numpy as np

    name, keys, pos, has_gauss, gauss = ckpt["rng"][0]["numpy"]
    ckpt["rng"][0]["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    torch.save(ckpt, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) != []
    train_transformer(run_cfg(out, resume="out_dir"), TokenDataset(tokens))
    assert_same_run(out, reference)


CHILD = textwrap.dedent("""
    import io, json, os, signal, sys
    import torch
    from nbp.data import TokenDataset
    from nbp.train import LoopConfig, TransformerTrainConfig, train_transformer

    real_save, calls = torch.save, []

    def dying_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])   # half the file is on disk ...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)                  # ... when the process is killed

    torch.save = dying_save
    spec = json.loads(sys.argv[1])
    train_transformer(TransformerTrainConfig(**spec), TokenDataset(sys.argv[2]))
""")


def test_sigkill_during_checkpoint_write_resumes_exactly(tokens, reference, tmp_path):
    out = tmp_path / "run"
    cfg = run_cfg(out)
    spec = {"model": cfg.model.to_dict(), "out_dir": str(out), "p_drop_cond": cfg.p_drop_cond,
            "loop": cfg.loop.to_dict()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PACKAGE_ROOT}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec), str(tokens)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = list(out.glob(".checkpoint.tmp.*.pt"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0      # the killed write's leftover
    assert losses(out)[-1][0] == 4                              # logged up to the killed step
    train_transformer(run_cfg(out, resume="out_dir"), TokenDataset(tokens))
    assert not list(out.glob(".*.tmp.*"))                       # cleaned at start
    assert_same_run(out, reference)


def test_torn_log_line_does_not_block_resume(tokens, reference, tmp_path):
    out = tmp_path / "run"
    train_transformer(run_cfg(out, stop_at=2), TokenDataset(tokens))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 4.1')                       # a write cut short
    train_transformer(run_cfg(out, resume="out_dir"), TokenDataset(tokens))
    assert_same_run(out, reference)


def test_bad_log_line_inside_is_named(tokens, tmp_path):
    out = tmp_path / "run"
    train_transformer(run_cfg(out, stop_at=2), TokenDataset(tokens))
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    with pytest.raises(ValueError, match=r"log\.jsonl' line 2 is not a log record"):
        train_transformer(run_cfg(out, resume="out_dir"), TokenDataset(tokens))


def test_enospc_on_checkpoint_write_is_one_line(tokens, tmp_path, monkeypatch, capsys):
    """Without a small filesystem: torch's own wrapping of a failed write, reproduced."""
    import nbp.train.checkpoint as ckpt

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", full_disk_save)
    out = tmp_path / "run"
    rc = main(["train", "transformer", "--tokens", str(tokens), "--out", str(out), "--steps", "2",
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "checkpoint.pt" in err and "no space left on device" in err and "enforce" not in err
    assert not (out / "checkpoint.pt").exists() and not list(out.glob(".*.tmp.*"))


def test_enospc_on_log_write_leaves_no_torn_line(tmp_path, monkeypatch):
    import nbp.train.run_files as rf

    log = tmp_path / "log.jsonl"
    append_log(log, {"step": 1, "loss": 2.0})
    real_write = os.write

    def short_write(fd, data):
        real_write(fd, data[:7])                                # part of the line lands
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rf.os, "write", short_write)
    with pytest.raises(WriteError, match=r"log\.jsonl'.*no space left on device"):
        append_log(log, {"step": 2, "loss": 1.0})
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n'


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount; skipped with the reason otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full-disk test needs root to mount a small tmpfs")
    if shutil.which("mount") is None:
        pytest.skip("a full-disk test needs the mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_checkpoint_is_one_line(tokens, small_disk, capsys):
    out = small_disk / "run"
    rc = main(["train", "transformer", "--tokens", str(tokens), "--out", str(out), "--steps", "2",
               "--n-embd", "128", "--no-progress", "--log-every", "1"])   # ~5 MB checkpoint
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{out / 'checkpoint.pt'}" in err and "no space left on device" in err
    assert not list(out.glob(".*.tmp.*")) and not (out / "checkpoint.pt").exists()
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [1, 2]


def test_full_disk_log_line_is_cut_back(small_disk):
    log = small_disk / "log.jsonl"
    log.write_text("x" * 4000 + "\n")                           # 96 bytes left in its page
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    with pytest.raises(WriteError, match=r"log\.jsonl'.*no space left on device"):
        append_log(log, {"step": 2, "loss": 1.0, "pad": "y" * 200})
    assert log.read_text() == "x" * 4000 + "\n"
