"""Training checkpoints: written atomically, resumed exactly, loadable on one process.

A checkpoint (``torch.save`` of a dict) holds:

* ``identity``: the JSON-able settings a resumed run must share (model config,
  data description, global batch, seed, optimiser settings, total steps...);
  ``load_checkpoint`` refuses a file whose identity differs and names the keys;
* ``model`` / ``optimizer``: full (unsharded, CPU) state dicts keyed by
  parameter name, gathered with ``torch.distributed.checkpoint.state_dict``
  so the same file serves 1 process, DDP and FSDP2;
* ``scheduler``, ``step`` and ``rng``: the torch / numpy / python / CUDA RNG
  states and the trainer's own generators, one entry per rank (the data order
  is a function of the step; see ``distributed.global_batch_indices``).

A checkpoint holds only tensors and plain Python data, so it is read with
``torch.load(weights_only=True)``: a planted file cannot run code when a run is
resumed. Files written before the numpy RNG state was stored as a tensor load
through an allow-list of exactly the three numpy types that state needs.

Writes go through a Python file object so that a full disk surfaces as the
``OSError`` it is (``WriteError``: one line naming the file), not as torch's
``[enforce fail at inline_container.cc] unexpected pos``.
"""
from __future__ import annotations

import errno
import json
import pickle
import random
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict)

from ..io import atomic_path
from .distributed import DistEnv, all_gather_objects, is_fsdp

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "check_identity", "rng_state",
           "set_rng_state", "explain_write_errors", "WriteError", "FORMAT"]

FORMAT = "nbp-train-checkpoint-v1"


class WriteError(RuntimeError):
    """A training file could not be written (disk full, permissions...); the message names it."""


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch wraps a failed file write in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextmanager
def explain_write_errors(path: str | Path):
    """Turn a failed write of ``path`` into a one-line ``WriteError`` naming the file."""
    try:
        yield
    except Exception as e:
        err = _os_error(e)
        if err is None:
            raise
        reason = ("no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT)
                  else err.strerror or str(err))
        raise WriteError(f"cannot write {str(path)!r}: {reason}") from e


def _numpy_rng_globals() -> list:
    """The globals a numpy ``MT19937`` state pickles to (older checkpoints stored it raw)."""
    core = getattr(np, "_core", None) or np.core
    return [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's RNG states (torch, CUDA, numpy, python, and the named generators)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)],
             "python": random.getstate(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])


def _canon(identity: dict) -> dict:
    """Round-trip through JSON so tuples/lists and int/float keys compare as stored."""
    return json.loads(json.dumps(identity, sort_keys=True))


def check_identity(stored: dict, current: dict, path: str | Path) -> None:
    """Raise ValueError naming every setting on which a checkpoint and this run differ."""
    a, b = _flatten(_canon(stored)), _flatten(_canon(current))
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in diff[:6])
        more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise ValueError(f"resume: checkpoint {str(path)!r} was written by a run with another "
                         f"configuration ({detail}{more})")


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"model": {"n_embd": 64}} -> {"model.n_embd": 64}, so a refusal names the setting."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer, scheduler, step: int,
                    identity: dict, env: DistEnv, generators: dict | None = None,
                    extra: dict | None = None) -> dict | None:
    """Gather the full state and write it atomically from rank 0 (collective: call on all ranks).

    Returns the full model state dict on rank 0 (for an export), None on the others.
    Raises ``WriteError`` naming ``path`` when the file cannot be written.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    rngs = all_gather_objects(rng_state(generators), env)
    if not env.is_main:
        return None
    payload = {"format": FORMAT, "identity": _canon(identity), "step": int(step),
               "model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
               "rng": rngs, "world_size": env.world_size, "extra": extra or {}}
    with explain_write_errors(path), atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
    return model_sd


def _load_failure(e: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it would import {found.group(1)}, and checkpoints hold only tensors and plain data"
    if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in text:
        return "it holds objects other than tensors and plain data"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else 'unreadable'}"


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file onto the CPU and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unpickling refusal, a torn or foreign file
        raise ValueError(f"resume: {str(path)!r} is not an nbp training checkpoint "
                         f"({_load_failure(e)}); it was not loaded") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"resume: {str(path)!r} is not an nbp training checkpoint "
                         f"(expected format {FORMAT!r})")
    return ckpt


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer, scheduler, identity: dict,
                    env: DistEnv, generators: dict | None = None, ckpt: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the checkpoint dict.

    ckpt: ``read_checkpoint(path)`` when the caller has already read it.

    The identity is checked before anything is modified. RNG states are
    restored per rank when the world size matches; otherwise rank r takes
    entry ``r % n`` (weights and data order are still exact, dropout draws are not).
    """
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    check_identity(ckpt["identity"], identity, path)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    if is_fsdp(model):
        opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, ckpt["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, ckpt["optimizer"], options=opts)
    scheduler.load_state_dict(ckpt["scheduler"])
    rngs = ckpt["rng"]
    set_rng_state(rngs[env.rank % len(rngs)], generators)
    return ckpt
