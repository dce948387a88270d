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
``nbp.layout`` holds this layout, shared with generation. A token cache of longer
clips than the model trains on windows of the model's latent length
(``crop_frames``: ``nbp.data.window_starts``, drawn per (seed, step)); ``init`` starts
from a native model dir's weights (fine-tuning).

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
    p_drop_cond: per-sample condition dropout (CFG); loop: steps, batch, optimiser, checkpoints.

    crop_frames: train on windows of this many latent frames (the model's latent length t)
    cut from a cache of longer clips (``nbp.data.window_starts``): a window starts at the
    clip's start with probability ``crop_start_prob``, else mid-clip, and keeps the clip's
    label. init: a native model dir (``save_pretrained``) whose weights start the run; its
    config must equal ``model``.
    """

    model: TransformerConfig | dict
    out_dir: str
    tokens: str | None = None
    p_drop_cond: float = 0.0
    backend: str = "auto"
    loop: LoopConfig = field(default_factory=LoopConfig)
    crop_frames: int | None = None
    crop_start_prob: float = 0.25
    init: str | None = None

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = TransformerConfig.from_dict(self.model)
        if isinstance(self.loop, dict):
            self.loop = LoopConfig.from_dict(self.loop)
        if not 0.0 <= self.p_drop_cond < 1.0:
            raise ValueError(f"p_drop_cond: expected a probability in [0, 1), got {self.p_drop_cond!r}")
        if self.p_drop_cond > 0 and self.model.cond_len == 0:
            raise ValueError("p_drop_cond: condition dropout needs a conditional model (cond_len > 0)")
        t = self.model.latent_shape[0]
        if self.crop_frames is not None and self.crop_frames != t:
            raise ValueError(f"crop_frames: windows must have the model's latent length t={t} "
                             f"(latent_shape {self.model.latent_shape}), got {self.crop_frames!r}")
        if not 0.0 <= self.crop_start_prob <= 1.0:
            raise ValueError(f"crop_start_prob: expected a probability in [0, 1], got "
                             f"{self.crop_start_prob!r}")


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


def _check_tokens(dataset, cfg: TransformerConfig, crop_frames: int | None = None) -> None:
    """Refuse a cache the model cannot train on; crop_frames: as in TransformerTrainConfig."""
    shape, want = tuple(dataset.codes.shape[1:]), tuple(cfg.latent_shape)
    if crop_frames is None and shape != want:
        hint = (f"; a cache of longer clips trains on windows of t={want[0]} latent frames with "
                f"crop_frames={want[0]} (--crop-frames {want[0]})"
                if shape[1:] == want[1:] and shape[0] > want[0] else "")
        raise ValueError(f"tokens: the cache's latent grid {shape} differs from the model's "
                         f"latent_shape {want}{hint}")
    if crop_frames is not None and (shape[1:] != want[1:] or shape[0] < want[0]):
        raise ValueError(f"tokens: windows of the model's latent_shape {want} need a cache of "
                         f"at least {want[0]} latent frames of {want[1]}x{want[2]}, got {shape}")
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
    build_sequences(dataset.codes[:1, :want[0]], dataset.labels[:1, None] if cfg.cond_len else None,
                    cfg)


def _load_init(path: str, cfg: TransformerConfig) -> dict:
    """The float32 state dict of the native model dir ``path``, whose config must be ``cfg``."""
    init = Path(path)
    if not (init / "config.json").is_file() or not (init / "model.safetensors").is_file():
        raise ValueError(f"init: {str(init)!r} is not a native model dir (config.json + "
                         f"model.safetensors, as save_pretrained writes)")
    model = NBPTransformer.from_pretrained(init, dtype=torch.float32)
    ours, theirs = cfg.to_dict(), model.config.to_dict()
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"init: {str(init)!r} has another config than the model trained: "
                         + ", ".join(f"{k} {theirs.get(k)!r} (here {ours.get(k)!r})" for k in differ))
    return model.state_dict()


def _identity(cfg: TransformerTrainConfig, dataset) -> dict:
    """What a resumed run must share; crop and init appear only when used, so checkpoints of
    runs without them keep their identity."""
    data_id = {k: v for k, v in dataset.describe().items() if k != "path"}
    identity = {"kind": "transformer", "model": cfg.model.to_dict(), "data": data_id,
                "p_drop_cond": cfg.p_drop_cond}
    if cfg.crop_frames is not None:
        identity["crop"] = {"frames": cfg.crop_frames, "start_prob": cfg.crop_start_prob}
    if cfg.init is not None:
        identity["init"] = str(Path(cfg.init).resolve())
    return identity


def _window_fn(cfg: TransformerTrainConfig, env: DistEnv, num_latent: int):
    """codes int [b, T, h, w] of this rank at ``step`` -> its windows [b, t, h, w] (identity
    without cropping)."""
    if cfg.crop_frames is None:
        return lambda step, codes: codes
    from ..data.tokens import crop_windows, window_starts

    def crop(step: int, codes: torch.Tensor) -> torch.Tensor:
        starts = window_starts(step, cfg.loop.global_batch, num_latent, cfg.crop_frames,
                               start_prob=cfg.crop_start_prob, seed=cfg.loop.seed)
        per = cfg.loop.global_batch // env.world_size
        return crop_windows(codes, starts[env.rank * per:(env.rank + 1) * per], cfg.crop_frames)
    return crop


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
    _check_tokens(dataset, mcfg, cfg.crop_frames)
    init = _load_init(cfg.init, mcfg) if cfg.init is not None else None
    env = init_distributed(cfg.loop.device)
    try:
        torch.manual_seed(cfg.loop.seed)
        model = NBPTransformer(mcfg)
        if init is not None:
            model.load_state_dict(init)
        model = model.to(env.device)
        objective = wrap_model(LMObjective(model, cfg.backend), env, fsdp=cfg.loop.fsdp,
                               shard_modules=(Block,))
        identity = _identity(cfg, dataset)
        has_cond = mcfg.cond_len == 1
        window = _window_fn(cfg, env, dataset.codes.shape[1])

        def collate(items: list) -> tuple[torch.Tensor, torch.Tensor | None]:
            codes = torch.stack([it["codes"] for it in items])
            cond = torch.tensor([[it["label"]] for it in items]) if has_cond else None
            return codes, cond

        def step_fn(step: int, batch) -> torch.Tensor:
            codes, cond = batch
            batch = build_sequences(window(step, codes), cond, mcfg)
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
            "p_drop_cond": cfg.p_drop_cond, "backend": cfg.backend, "loop": cfg.loop.to_dict(),
            "crop_frames": cfg.crop_frames, "crop_start_prob": cfg.crop_start_prob,
            "init": None if cfg.init is None else str(cfg.init)}


def _export(mcfg: TransformerConfig, state_dict: dict, out: Path) -> None:
    """Native dir (config.json + model.safetensors) from the objective's full state dict."""
    from .loop import export_native

    sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
    model = NBPTransformer(mcfg)
    model.load_state_dict(sd)
    export_native(model, out)
