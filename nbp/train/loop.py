"""The training loop shared by the transformer and tokenizer trainers.

``run_loop`` owns the optimiser, the schedule, mixed precision (bf16 autocast
on CUDA, float32 on CPU), gradient clipping, the progress bar, the loss log
(``out_dir/log.jsonl``, one JSON object per logged step), checkpoints
(``out_dir/checkpoint.pt``, atomic, exact resume) and the final export
(``out_dir/model``, a native dir). The trainer supplies ``step_fn(step) -> loss``
which must draw its batch as a function of ``step`` (see
``distributed.local_batch_indices``) so that resuming is exact.

Output dir rules: an existing checkpoint is never overwritten by a fresh run
(pass ``resume``), and a resume from another configuration is refused before
anything is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..io import atomic_write_text
from .checkpoint import load_checkpoint, read_checkpoint, check_identity, save_checkpoint
from .distributed import DistEnv, local_batch_indices
from .optim import OptimConfig, build_optimizer, build_scheduler, clip_grad_norm

__all__ = ["LoopConfig", "run_loop", "export_native", "step_batches", "CHECKPOINT_NAME",
           "LOG_NAME", "EXPORT_NAME"]

CHECKPOINT_NAME, LOG_NAME, EXPORT_NAME = "checkpoint.pt", "log.jsonl", "model"

# step_fn(step, batch) -> loss, or (loss, {metric name: scalar tensor})
StepFn = Callable[[int, Any], Union[torch.Tensor, tuple]]


@dataclass
class LoopConfig:
    """steps: total optimiser steps (the schedule's length); stop_at: end this run early at
    that step (checkpointed; resume later); resume: None (refuse an out_dir holding a
    checkpoint), "auto" (continue ``out_dir/checkpoint.pt`` if there is one, else start) or a
    checkpoint path (which must exist); global_batch: clips per step over all processes; threads: CPU
    threads for torch (None: torch's default). On a shared CPU, 1 thread per process can be
    many times faster than oversubscribed OpenMP threads."""

    steps: int = 1000
    global_batch: int = 8
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    stop_at: int | None = None
    resume: str | None = None
    device: str | None = None
    fsdp: bool = False
    amp: bool = True
    progress: bool = True
    export: bool = True
    threads: int | None = None

    def __post_init__(self):
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        for name in ("steps", "global_batch", "log_every", "ckpt_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"stop_at: expected a step in (0, steps={self.steps}], "
                             f"got {self.stop_at!r}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "LoopConfig":
        return cls(**d)

    def identity(self) -> dict:
        """The settings a resumed run must share (not: stop_at, resume, device, logging)."""
        return {"steps": self.steps, "global_batch": self.global_batch, "seed": self.seed,
                "optim": dataclasses.asdict(self.optim)}


def _resume_path(cfg: LoopConfig, out_dir: Path) -> Path | None:
    ckpt = out_dir / CHECKPOINT_NAME
    if cfg.resume is None:
        if ckpt.exists():
            raise ValueError(f"out_dir: {str(out_dir)!r} already holds a checkpoint; pass "
                             f"resume='auto' (--resume) to continue it or choose another out_dir")
        return None
    if cfg.resume == "auto" and not ckpt.exists():
        return None  # nothing to continue yet: start (lets scripts always pass --resume)
    path = ckpt if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    return path


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (a resumed run rewrites what follows)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def step_batches(dataset, cfg: LoopConfig, env: DistEnv, collate: Callable[[list], Any],
                 num_workers: int = 0) -> Callable[[int, int], Iterator]:
    """batches(start, stop): this rank's batch of each step, drawn as a function of the step.

    With ``num_workers`` a DataLoader decodes ahead in worker processes; the
    batches are the same either way (items are pure functions of their index).
    """
    def indices(start: int, stop: int) -> list[list[int]]:
        return [local_batch_indices(s, cfg.global_batch, len(dataset), cfg.seed, env)
                for s in range(start, stop)]

    def batches(start: int, stop: int) -> Iterator:
        if num_workers <= 0:
            return (collate([dataset[i] for i in idx]) for idx in indices(start, stop))
        return iter(DataLoader(dataset, batch_sampler=indices(start, stop), collate_fn=collate,
                               num_workers=num_workers, persistent_workers=False))
    return batches


def _mean_across(value: torch.Tensor, env: DistEnv) -> float:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return float(value)


def _prepare(module: nn.Module, cfg: LoopConfig, env: DistEnv, out_dir: Path, identity: dict):
    """(optimizer, scheduler, first step), restored from a checkpoint when resuming."""
    resume = _resume_path(cfg, out_dir)
    if resume is not None:  # refuse a foreign checkpoint before building anything else
        check_identity(read_checkpoint(resume)["identity"], identity, resume)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    step = 0
    if resume is not None:
        step = load_checkpoint(resume, model=module, optimizer=optimizer, scheduler=scheduler,
                               identity=identity, env=env)["step"]
    return optimizer, scheduler, step


def _optimizer_step(module: nn.Module, loss: torch.Tensor, optimizer, scheduler,
                    grad_clip: float | None) -> torch.Tensor:
    """Backward, clip, step, schedule; returns the pre-clip gradient norm (no host sync)."""
    loss.backward()
    gnorm = clip_grad_norm(module, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return gnorm


def run_loop(module: nn.Module, step_fn: StepFn, cfg: LoopConfig, env: DistEnv, *,
             batches: Callable[[int, int], Iterator], out_dir: Path, identity: dict,
             export: Callable[[dict, Path], None] | None, train_config: dict) -> dict:
    """Optimise ``module`` (possibly DDP/FSDP-wrapped) for ``cfg.steps``; returns a summary dict.

    batches(start, stop) yields this rank's batch of every step in [start, stop);
    step_fn(step, batch) returns the loss, or (loss, {name: scalar tensor}) to log
    more metrics; export(full_state_dict, dir) writes the final native dir on rank 0.
    """
    out_dir = Path(out_dir)
    if cfg.global_batch % env.world_size:
        raise ValueError(f"global_batch: {cfg.global_batch} is not divisible by the number of "
                         f"processes ({env.world_size})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    identity = {**identity, "loop": cfg.identity()}
    optimizer, scheduler, step = _prepare(module, cfg, env, out_dir, identity)
    if env.is_main:
        atomic_write_text(out_dir / "train_config.json", json.dumps(train_config, indent=2) + "\n")
        _truncate_log(out_dir / LOG_NAME, step)
    stop = cfg.stop_at or cfg.steps
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and env.device.type == "cuda"
           else contextlib.nullcontext())
    module.train()
    bar = tqdm(total=stop, initial=step, disable=not (cfg.progress and env.is_main), desc="train")
    sums, n_sum, t0, last = {}, 0, time.perf_counter(), None
    for batch in batches(step, stop):
        with amp:
            out = step_fn(step, batch)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        gnorm = _optimizer_step(module, loss, optimizer, scheduler, cfg.optim.grad_clip)
        step += 1
        for k, v in {"loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        n_sum += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == stop:
            means = {k: _mean_across(v / n_sum, env) for k, v in sums.items()}
            last = _log(out_dir, env, step, means, float(gnorm), scheduler.get_last_lr()[0],
                        n_sum / (time.perf_counter() - t0), bar)
            sums, n_sum, t0 = {}, 0, time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == stop:
            save_checkpoint(out_dir / CHECKPOINT_NAME, model=module, optimizer=optimizer,
                            scheduler=scheduler, step=step, identity=identity, env=env)
    bar.close()
    if step == cfg.steps and cfg.export and export is not None:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(module, options=opts)
        if env.is_main:
            export(sd, out_dir / EXPORT_NAME)
    return {"step": step, "last": last}


def _log(out_dir: Path, env: DistEnv, step: int, means: dict, gnorm: float, lr: float,
         steps_per_s: float, bar) -> dict:
    rec = {"step": step, **means, "grad_norm": gnorm, "lr": lr, "steps_per_s": steps_per_s,
           "time": time.time()}
    if env.is_main:
        with open(out_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(**{k: f"{v:.4g}" for k, v in means.items()}, lr=f"{lr:.2e}")
    return rec


def export_native(model: nn.Module, out: Path) -> Path:
    """Write ``out`` as a native dir (config.json + model.safetensors) with ``save_pretrained``
    (NBPTransformer / VideoTokenizer; ``nbp.native.save_native`` where the class lacks it)."""
    save = getattr(model, "save_pretrained", None)
    if callable(save):
        save(out)
        return Path(out)
    from ..native import save_native

    return save_native(model, out)
