"""AdamW with the published hyper-parameter style: decay on matrices only, warmup + decay.

The published trainer (minGPT style) decays the weights of Linear layers and
nothing else: no biases, LayerNorm/GroupNorm scales, embeddings or the
learned position table. ``param_groups`` applies the same rule generally:
a parameter is decayed iff it is a matrix or a convolution kernel
(``ndim >= 2``) that is not an embedding table (``nn.Embedding`` weights and
parameters named ``*pos_emb``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = ["OptimConfig", "param_groups", "build_optimizer", "build_scheduler", "lr_factor",
           "clip_grad_norm"]


@dataclass
class OptimConfig:
    """lr: peak learning rate; warmup_steps: linear ramp from ``warmup_init * lr``;
    schedule: "cosine" | "linear" | "constant" decay to ``min_lr_ratio * lr`` at
    ``total_steps``; grad_clip: max global gradient norm (None: off)."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_init: float = 0.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule: expected 'cosine', 'linear' or 'constant', "
                             f"got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ValueError(f"warmup_steps and weight_decay must be >= 0, got "
                             f"{self.warmup_steps!r} and {self.weight_decay!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip: expected a positive number or None, got {self.grad_clip!r}")
        self.betas = tuple(float(b) for b in self.betas)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (matrices, conv kernels) and ``no_decay`` (everything else)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_table = id(p) in embeddings or name.split(".")[-1] == "pos_emb"
        (decay if p.ndim >= 2 and not is_table else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                             eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_init + (1.0 - cfg.warmup_init) * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(total_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following ``lr_factor``; its state (last_epoch) goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))


def clip_grad_norm(model: nn.Module, max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm (DDP and FSDP2 DTensor parameters alike).

    Returns the norm before clipping as a float32 scalar tensor (no host sync).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
        norm = norm.full_tensor()
    return norm.detach().float()
