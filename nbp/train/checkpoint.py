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
"""
from __future__ import annotations

import json
import random
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
           "set_rng_state", "FORMAT"]

FORMAT = "nbp-train-checkpoint-v1"


def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """This process's RNG states (torch, CUDA, numpy, python, and the named generators)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
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
    a, b = _canon(stored), _canon(current)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a.get(k)!r} vs now {b.get(k)!r}" for k in diff[:6])
        raise ValueError(f"resume: checkpoint {str(path)!r} was written by a run with another "
                         f"configuration ({detail})")


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer, scheduler, step: int,
                    identity: dict, env: DistEnv, generators: dict | None = None,
                    extra: dict | None = None) -> None:
    """Gather the full state and write it atomically from rank 0 (collective: call on all ranks)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    rngs = all_gather_objects(rng_state(generators), env)
    if not env.is_main:
        return
    payload = {"format": FORMAT, "identity": _canon(identity), "step": int(step),
               "model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
               "rng": rngs, "world_size": env.world_size, "extra": extra or {}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file onto the CPU and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"resume: {str(path)!r} is not an nbp training checkpoint "
                         f"(expected format {FORMAT!r})")
    return ckpt


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer, scheduler, identity: dict,
                    env: DistEnv, generators: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``path``; returns the checkpoint dict.

    The identity is checked before anything is modified. RNG states are
    restored per rank when the world size matches; otherwise rank r takes
    entry ``r % n`` (weights and data order are still exact, dropout draws are not).
    """
    ckpt = read_checkpoint(path)
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
