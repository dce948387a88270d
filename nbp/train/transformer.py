"""Train an NBP / NTP / hybrid transformer on pre-extracted tokens.

Sequences follow the published training (nbp/lm_transformer.py forward):

* non-hybrid: ``seq = [cond, bov * L (if config.bov), z]``; the model reads
  ``seq[:-L]`` and position ``p`` predicts ``seq[p + L]``; the logits after the
  condition are scored against ``seq[cond_len + L:]``. Without bov the first
  block is never a target (as published); with bov (our class-conditional
  layout) the L bov ids form the first block and every code is a target.
* hybrid: ``seq = [cond, bov, z_0..z_{L-1}, fillers 1..L-1, z_L..]``; the
  model reads ``seq[:-L]`` and the logits after the condition are scored
  against ``z`` (the fillers are never targets).

``z`` are the codes in block-major order (``nbp.blocks.to_block_order`` with
``config.block_shape``) shifted by ``config.video_offset``; the condition
(class label) is shifted by ``config.cond_offset``. NTP is block shape (1, 1, 1).
``nbp.layout`` holds this layout, shared with generation.

Condition dropout for classifier-free guidance replaces a sample's condition
embeddings by ``model.uncond_embedding``, per sample with probability
``p_drop_cond``. As in the published model, ``uncond_embedding`` stays a fixed
random buffer (not trained): the network learns to read that fixed vector as
"no condition", and checkpoints stay state-dict compatible with the published ones.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import layout
from ..config import TransformerConfig
from ..model import NBPTransformer, Block
from .distributed import DistEnv, init_distributed, shutdown, unwrap, wrap_model
from .loop import LoopConfig, run_loop, step_batches

__all__ = ["TransformerTrainConfig", "build_sequences", "LMObjective", "train_transformer"]


@dataclass
class TransformerTrainConfig:
    """model: a TransformerConfig (or its dict); tokens: path of an ``extract_tokens`` cache;
    p_drop_cond: per-sample condition dropout (CFG); loop: steps, batch, optimiser, checkpoints."""

    model: TransformerConfig | dict
    out_dir: str
    tokens: str | None = None
    p_drop_cond: float = 0.0
    backend: str = "auto"
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = TransformerConfig.from_dict(self.model)
        if isinstance(self.loop, dict):
            self.loop = LoopConfig.from_dict(self.loop)
        if not 0.0 <= self.p_drop_cond < 1.0:
            raise ValueError(f"p_drop_cond: expected a probability in [0, 1), got {self.p_drop_cond!r}")
        if self.p_drop_cond > 0 and self.model.cond_len == 0:
            raise ValueError("p_drop_cond: condition dropout needs a conditional model (cond_len > 0)")


def build_sequences(codes: torch.Tensor, cond: torch.Tensor | None,
                    cfg: TransformerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and targets (``nbp.layout.training_sequences``).

    codes: int [B, t, h, w] raster-order tokenizer codes; cond: int [B, cond_len]
    raw condition ids (class labels), or None when ``cfg.cond_len == 0``.
    Returns (input_ids int64 [B, S], targets int64 [B, S]) with -100 where a
    position predicts nothing (the condition).
    """
    return layout.training_sequences(cfg, codes, cond)


class LMObjective(nn.Module):
    """Cross-entropy of an NBPTransformer under its NBP mask, with per-sample CFG dropout.

    The module wrapped by DDP / FSDP2, so the condition embeddings (which may be
    swapped for ``uncond_embedding``) are computed inside the wrapped forward.
    ``attend(cond_len) -> AttendFn`` overrides the attention (tests compare backends).
    """

    def __init__(self, model: NBPTransformer, backend: str = "auto",
                 attend: Callable | None = None):
        super().__init__()
        self.model, self.backend, self._attend = model, backend, attend

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, targets: int64 [B, S]; drop_cond: bool [B] or None -> float32 scalar loss."""
        m, C = self.model, self.model.config.cond_len
        prefix = None
        if drop_cond is not None and C:
            cond_emb = m.tok_emb(input_ids[:, :C])                          # [B, C, E]
            uncond = m.uncond_embedding.to(cond_emb.dtype).expand_as(cond_emb)
            prefix = torch.where(drop_cond[:, None, None], uncond, cond_emb)
        attend = (self._attend(C) if self._attend is not None
                  else m.block_causal_attend(cond_len=C, backend=self.backend))
        x = m.embed(input_ids, prefix_embeddings=prefix)
        logits = m.logits(m.run_layers(x, attend))
        return F.cross_entropy(logits[:, C:].flatten(0, 1).float(), targets[:, C:].flatten(),
                               ignore_index=-100)


def _drop_mask(step: int, cfg: TransformerTrainConfig, env: DistEnv) -> torch.Tensor | None:
    """Per-sample condition dropout, a function of (seed, step) so any world size draws the same."""
    if cfg.p_drop_cond <= 0:
        return None
    g = torch.Generator().manual_seed(cfg.loop.seed * 7919 + step + 1)
    full = torch.rand(cfg.loop.global_batch, generator=g) < cfg.p_drop_cond
    per = cfg.loop.global_batch // env.world_size
    return full[env.rank * per:(env.rank + 1) * per].to(env.device)


def _check_tokens(dataset, cfg: TransformerConfig) -> None:
    shape = tuple(dataset.codes.shape[1:])
    if shape != cfg.latent_shape:
        raise ValueError(f"tokens: the cache's latent grid {shape} differs from the model's "
                         f"latent_shape {cfg.latent_shape}")
    if int(dataset.codes.max()) >= cfg.codebook_size or int(dataset.codes.min()) < 0:
        raise ValueError(f"tokens: codes outside [0, codebook_size={cfg.codebook_size})")
    if cfg.cond_len > 1:
        raise ValueError(f"model: cond_len={cfg.cond_len}; token caches carry one class label "
                         f"per clip, so only cond_len 0 or 1 can be trained from them")
    if cfg.cond_len == 1:
        lo, hi = int(dataset.labels.min()), int(dataset.labels.max())
        if lo < 0 or hi >= cfg.cond_vocab_size:
            raise ValueError(f"tokens: labels in [{lo}, {hi}] do not fit cond_vocab_size "
                             f"{cfg.cond_vocab_size}")
    # the sequence length (vs max_seq_len) and id layout, before any file is written
    build_sequences(dataset.codes[:1], dataset.labels[:1, None] if cfg.cond_len else None, cfg)


def train_transformer(cfg: TransformerTrainConfig, dataset=None) -> NBPTransformer:
    """Train (or resume) under ``cfg``; returns the trained model (unwrapped, on its device).

    dataset: a ``TokenDataset`` (default: ``TokenDataset(cfg.tokens)``). Run it
    under ``torchrun`` for DDP (``cfg.loop.fsdp`` for FSDP2).
    """
    from ..data.tokens import TokenDataset

    if dataset is None:
        if cfg.tokens is None:
            raise ValueError("tokens: pass a token cache path (or a TokenDataset)")
        dataset = TokenDataset(cfg.tokens)
    mcfg = cfg.model
    _check_tokens(dataset, mcfg)
    env = init_distributed(cfg.loop.device)
    try:
        torch.manual_seed(cfg.loop.seed)
        model = NBPTransformer(mcfg).to(env.device)
        objective = wrap_model(LMObjective(model, cfg.backend), env, fsdp=cfg.loop.fsdp,
                               shard_modules=(Block,))
        data_id = {k: v for k, v in dataset.describe().items() if k != "path"}
        identity = {"kind": "transformer", "model": mcfg.to_dict(), "data": data_id,
                    "p_drop_cond": cfg.p_drop_cond}
        has_cond = mcfg.cond_len == 1

        def collate(items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
            codes = torch.stack([it["codes"] for it in items])
            cond = torch.tensor([[it["label"]] for it in items]) if has_cond else None
            return build_sequences(codes, cond, mcfg)

        def step_fn(step: int, batch) -> torch.Tensor:
            input_ids, targets = (t.to(env.device, non_blocking=True) for t in batch)
            return objective(input_ids, targets, _drop_mask(step, cfg, env))

        batches = step_batches(dataset, cfg.loop, env, collate)
        run_loop(objective, step_fn, cfg.loop, env, batches=batches, out_dir=Path(cfg.out_dir),
                 identity=identity,
                 export=functools.partial(_export, mcfg), train_config=_as_json(cfg))
        return unwrap(objective).model
    finally:
        shutdown(env)


def _as_json(cfg: TransformerTrainConfig) -> dict:
    return {"kind": "transformer", "model": cfg.model.to_dict(), "out_dir": str(cfg.out_dir),
            "tokens": None if cfg.tokens is None else str(cfg.tokens),
            "p_drop_cond": cfg.p_drop_cond, "backend": cfg.backend, "loop": cfg.loop.to_dict()}


def _export(mcfg: TransformerConfig, state_dict: dict, out: Path) -> None:
    """Native dir (config.json + model.safetensors) from the objective's full state dict."""
    from .loop import export_native

    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    model = NBPTransformer(mcfg)
    model.load_state_dict(sd)
    export_native(model, out)
