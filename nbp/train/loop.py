"""The training loop shared by the transformer and tokenizer trainers.

``run_loop`` owns the optimiser, the schedule, mixed precision (bf16 autocast
on CUDA, float32 on CPU), gradient clipping, the progress bar, the loss log
(``out_dir/log.jsonl``, one JSON object per logged step), checkpoints
(``out_dir/checkpoint.pt``, atomic, exact resume) and, with every checkpoint,
a loadable native model dir (``out_dir/model``). The trainer supplies
``step_fn(step) -> loss`` which must draw its batch as a function of ``step``
(see ``distributed.local_batch_indices``) so that resuming is exact.

Output dir rules: an existing checkpoint is never overwritten by a fresh run
(pass ``resume``), and a resume from another configuration is refused before
anything is written. Only rank 0 writes.

Stopping: SIGINT (Ctrl-C) or SIGTERM ends the run after the step in progress,
on every rank at the same step; it is checkpointed and ``Interrupted`` is
raised (a ``KeyboardInterrupt`` carrying the step and the checkpoint path). A
second Ctrl-C stops at once, without a checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nbp_kernels.cpu_build import configure_threads

from .checkpoint import load_checkpoint, read_checkpoint, check_identity, save_checkpoint
from .distributed import DistEnv, local_batch_indices
from .optim import OptimConfig, build_optimizer, build_scheduler, clip_grad_norm
from .run_files import append_log, clean_stale_temps, export_dir, truncate_log, write_text

__all__ = ["LoopConfig", "run_loop", "export_native", "step_batches", "Interrupted",
           "CHECKPOINT_NAME", "LOG_NAME", "EXPORT_NAME", "CONFIG_NAME"]

CHECKPOINT_NAME, LOG_NAME, EXPORT_NAME = "checkpoint.pt", "log.jsonl", "model"
CONFIG_NAME = "train_config.json"


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM after ``step``, checkpointed at ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path, is_main: bool = True):
        super().__init__(f"stopped at step {step}, checkpoint at {checkpoint}")
        self.step, self.checkpoint, self.is_main = step, Path(checkpoint), is_main

# step_fn(step, batch) -> loss, or (loss, {metric name: scalar tensor})
StepFn = Callable[[int, Any], Union[torch.Tensor, tuple]]


@dataclass
class LoopConfig:
    """steps: total optimiser steps (the schedule's length); stop_at: end this run early at
    that step (checkpointed; resume later); resume: None (refuse an out_dir holding a
    checkpoint), "auto" (continue ``out_dir/checkpoint.pt`` if there is one, else start),
    "out_dir" (continue ``out_dir/checkpoint.pt``, which must exist: ``--resume``) or a
    checkpoint path (which must exist); global_batch: clips per step over all processes; threads: CPU
    threads for torch and the kernels (``configure_threads``; None: its default). On a shared CPU, 1 thread per process can be
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
        return None  # nothing to continue yet: start (lets scripts always pass resume="auto")
    if cfg.resume == "out_dir" and not ckpt.exists():
        what = "an empty folder" if out_dir.is_dir() and not any(out_dir.iterdir()) else (
            "no such folder" if not out_dir.exists() else f"no {CHECKPOINT_NAME} in it")
        raise ValueError(f"resume: nothing to resume in {str(out_dir)!r} ({what}); run without "
                         f"--resume to start a new run there")
    path = ckpt if cfg.resume in ("auto", "out_dir") else Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {str(path)!r}")
    return path


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
                               num_workers=num_workers, persistent_workers=False,
                               worker_init_fn=_ignore_stop_signals))
    return batches


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process, which stops them after
    checkpointing (a worker killed by it would fail the step in progress). SIGTERM
    still ends them: the loader's own shutdown sends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _mean_across(value: torch.Tensor, env: DistEnv) -> float:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return float(value)


def _prepare(module: nn.Module, cfg: LoopConfig, env: DistEnv, out_dir: Path, identity: dict):
    """(optimizer, scheduler, first step), restored from a checkpoint when resuming."""
    resume = _resume_path(cfg, out_dir)
    ckpt = None
    if resume is not None:  # refuse a foreign checkpoint before building anything else
        ckpt = read_checkpoint(resume)
        check_identity(ckpt["identity"], identity, resume)
    optimizer = build_optimizer(module, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    step = 0
    if resume is not None:
        step = load_checkpoint(resume, model=module, optimizer=optimizer, scheduler=scheduler,
                               identity=identity, env=env, ckpt=ckpt)["step"]
        if env.is_main:
            print(f"resumed from step {step} ({resume})", flush=True)
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


class _StopRequest:
    """SIGINT / SIGTERM set a flag the loop reads between steps (all ranks agree on it).

    Handlers are installed only on the main thread; a second SIGINT raises
    KeyboardInterrupt at once. Across ranks the flags are max-reduced without
    blocking: a step reads the reduction started at the step before, so the
    host never waits for the step it has just queued.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, env: DistEnv):
        self.env, self.flag, self.saved, self.pending = env, False, {}, None

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.saved = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        if self.pending is not None and exc[0] is None:
            self.pending[0].wait()  # every rank started it; leave no collective in flight
        for s, handler in self.saved.items():
            signal.signal(s, handler)

    def requested(self) -> bool:
        if not self.env.distributed:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.env.device)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        previous, self.pending = self.pending, (work, flag)
        if previous is None:
            return False
        previous[0].wait()
        return bool(previous[1].item())  # a stop anywhere stops every rank at this step


def _batches_until_stop(batches: Iterator, stop: _StopRequest) -> Iterator:
    """The batches, ended early by a stop request (a DataLoader whose workers got the
    same Ctrl-C fails: that failure is the stop too)."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except Exception:
            if stop.flag and not stop.env.distributed:  # ranks must leave together: see requested
                return
            raise
        yield batch


def _checkpoint(module, optimizer, scheduler, step: int, *, cfg: LoopConfig, env: DistEnv,
                out_dir: Path, identity: dict, export) -> None:
    """checkpoint.pt and, on rank 0, the loadable ``model/`` dir of the same weights."""
    sd = save_checkpoint(out_dir / CHECKPOINT_NAME, model=module, optimizer=optimizer,
                         scheduler=scheduler, step=step, identity=identity, env=env)
    if env.is_main and cfg.export and export is not None:
        # building the exported module draws from the RNG; a resumed run must see the same stream
        with torch.random.fork_rng(devices=[]):
            export_dir(lambda tmp: export(sd, tmp), out_dir / EXPORT_NAME)


def _start_files(out_dir: Path, env: DistEnv, step: int, train_config: dict) -> None:
    """Rank 0: remove a killed run's temporaries, write the config, trim the log to ``step``."""
    if not env.is_main:
        return
    clean_stale_temps(out_dir, (CHECKPOINT_NAME, LOG_NAME, CONFIG_NAME), EXPORT_NAME)
    write_text(out_dir / CONFIG_NAME, json.dumps(train_config, indent=2) + "\n")
    truncate_log(out_dir / LOG_NAME, step)


def run_loop(module: nn.Module, step_fn: StepFn, cfg: LoopConfig, env: DistEnv, *,
             batches: Callable[[int, int], Iterator], out_dir: Path, identity: dict,
             export: Callable[[dict, Path], None] | None, train_config: dict) -> dict:
    """Optimise ``module`` (possibly DDP/FSDP-wrapped) for ``cfg.steps``; returns a summary dict.

    batches(start, stop) yields this rank's batch of every step in [start, stop);
    step_fn(step, batch) returns the loss, or (loss, {name: scalar tensor}) to log
    more metrics; export(full_state_dict, dir) writes a native dir, on rank 0, with
    every checkpoint. Raises ``Interrupted`` after checkpointing when stopped by a signal.
    """
    out_dir = Path(out_dir)
    if cfg.global_batch % env.world_size:
        raise ValueError(f"global_batch: {cfg.global_batch} is not divisible by the number of "
                         f"processes ({env.world_size})")
    configure_threads(cfg.threads)
    identity = {**identity, "loop": cfg.identity()}
    optimizer, scheduler, step = _prepare(module, cfg, env, out_dir, identity)
    _start_files(out_dir, env, step, train_config)
    save = functools.partial(_checkpoint, module, optimizer, scheduler, cfg=cfg, env=env,
                             out_dir=out_dir, identity=identity, export=export)
    stop = cfg.stop_at or cfg.steps
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and env.device.type == "cuda"
           else contextlib.nullcontext())
    module.train()
    bar = tqdm(total=stop, initial=step, disable=not (cfg.progress and env.is_main), desc="train")
    sums, n_sum, t0, last, saved, halt = {}, 0, time.perf_counter(), None, step, False
    with _StopRequest(env) as request:
        for batch in _batches_until_stop(batches(step, stop), request):
            with amp:
                out = step_fn(step, batch)
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            gnorm = _optimizer_step(module, loss, optimizer, scheduler, cfg.optim.grad_clip)
            step, n_sum = step + 1, n_sum + 1
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            bar.update(1)
            halt = request.requested()
            if step % cfg.log_every == 0 or step == stop or halt:
                means = {k: _mean_across(v / n_sum, env) for k, v in sums.items()}
                last = _log(out_dir, env, step, means, float(gnorm), scheduler.get_last_lr()[0],
                            n_sum / (time.perf_counter() - t0), bar)
                sums, n_sum, t0 = {}, 0, time.perf_counter()
            if step % cfg.ckpt_every == 0 or step == stop or halt:
                save(step)
                saved = step
            if halt:
                break
    bar.close()
    if (halt or request.flag) and step < stop:
        if saved != step:  # stopped while waiting for data: the last finished step is saved
            save(step)
        raise Interrupted(step, out_dir / CHECKPOINT_NAME, env.is_main)
    return {"step": step, "last": last}


def _log(out_dir: Path, env: DistEnv, step: int, means: dict, gnorm: float, lr: float,
         steps_per_s: float, bar) -> dict:
    rec = {"step": step, **means, "grad_norm": gnorm, "lr": lr, "steps_per_s": steps_per_s,
           "time": time.time()}
    if env.is_main:
        append_log(out_dir / LOG_NAME, rec)
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
