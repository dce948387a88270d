"""Train a VideoTokenizer (causal 3D CNN autoencoder + FSQ) on reconstruction.

Loss: ``l1``, ``mse`` or ``l1+mse`` (their sum) between the decoder output and
the input video in [0, 1]; the FSQ rounding passes gradients straight through
(``VideoTokenizer.forward``). The published tokenizer was also trained with
perceptual (LPIPS) and adversarial terms; those are NOT implemented here (they
need pretrained networks that cannot be downloaded in this project), and the
trainer says so rather than accept a weight it would ignore.

``soft_steps`` (default 0, off) trains the first steps without rounding: the
decoder reads the bounded latents ``bound(z) / (levels // 2)`` (the values FSQ
would round), then FSQ's straight-through rounding takes over. Every logged
step also records the batch PSNR of the clamped reconstruction.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..tokenizer import TokenizerConfig, VideoTokenizer
from .distributed import init_distributed, shutdown, unwrap, wrap_model
from .loop import LoopConfig, export_native, run_loop, step_batches

__all__ = ["TokenizerTrainConfig", "TokenizerObjective", "reconstruction_loss", "psnr",
           "train_tokenizer"]

LOSSES = ("l1", "mse", "l1+mse")


@dataclass
class TokenizerTrainConfig:
    """model: a TokenizerConfig (or its dict); loss: one of ``LOSSES``; num_workers:
    DataLoader workers decoding clips ahead (0: in the training process)."""

    model: TokenizerConfig | dict
    out_dir: str
    loss: str = "mse"
    num_workers: int = 0
    soft_steps: int = 0
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = TokenizerConfig.from_dict(self.model)
        if isinstance(self.loop, dict):
            self.loop = LoopConfig.from_dict(self.loop)
        if int(self.soft_steps) < 0:
            raise ValueError(f"soft_steps: expected an int >= 0, got {self.soft_steps!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.loss!r} (perceptual and "
                             f"adversarial terms are not implemented)")


def reconstruction_loss(recon: torch.Tensor, video: torch.Tensor, kind: str) -> torch.Tensor:
    """recon, video: float [B, 3, T, H, W] -> float32 scalar."""
    r, v = recon.float(), video.float()
    if kind == "l1":
        return F.l1_loss(r, v)
    if kind == "mse":
        return F.mse_loss(r, v)
    return F.l1_loss(r, v) + F.mse_loss(r, v)


def psnr(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) over the batch of clamped reconstructions; float32 scalar."""
    mse = (recon.float().clamp(0, 1) - video.float()).pow(2).flatten(1).mean(1)
    return (-10.0 * torch.log10(mse.clamp_min(1e-10))).mean()


class TokenizerObjective(nn.Module):
    """Reconstruction loss of a VideoTokenizer; the module DDP / FSDP2 wrap."""

    def __init__(self, tokenizer: VideoTokenizer, loss: str):
        super().__init__()
        self.tokenizer, self.kind = tokenizer, loss

    def forward(self, video: torch.Tensor, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """video float [B, 3, T, H, W] in [0, 1] -> (loss, PSNR), float32 scalars.

        soft: decode the bounded latents without rounding (warmup).
        """
        tok = self.tokenizer
        z = tok.encode_latents(video)
        if soft:
            q = tok.quantizer
            half = torch.tensor([lv // 2 for lv in q.levels], dtype=torch.float32, device=z.device)
            codes = (q.bound(z.movedim(1, -1)) / half).movedim(-1, 1)
        else:
            codes, _ = tok.quantize(z)
        recon = tok.decode_latents(codes)
        return reconstruction_loss(recon, video, self.kind), psnr(recon.detach(), video)


def _check_data(dataset, mcfg: TokenizerConfig) -> None:
    if len(dataset) == 0:
        raise ValueError("dataset: expected at least one clip")
    video = dataset[0]["video"]
    if video.dim() != 4 or video.shape[0] != mcfg.in_channels:
        raise ValueError(f"dataset: items' video must be [{mcfg.in_channels}, T, H, W], got "
                         f"{tuple(video.shape)}")
    mcfg.latent_shape(*video.shape[1:])  # raises ValueError when T, H, W do not fit the strides


def train_tokenizer(cfg: TokenizerTrainConfig, dataset) -> VideoTokenizer:
    """Train (or resume) a tokenizer on ``dataset`` (items ``{"video": float [3, T, H, W]}``).

    Returns the trained tokenizer (unwrapped). Works under ``torchrun`` (DDP / FSDP2).
    """
    mcfg = cfg.model
    _check_data(dataset, mcfg)
    env = init_distributed(cfg.loop.device)
    try:
        torch.manual_seed(cfg.loop.seed)
        model = wrap_model(TokenizerObjective(VideoTokenizer(mcfg).to(env.device), cfg.loss), env,
                           fsdp=cfg.loop.fsdp)
        describe = getattr(dataset, "describe", None)
        data_id = describe() if callable(describe) else {"kind": type(dataset).__name__,
                                                          "num_clips": len(dataset)}
        identity = {"kind": "tokenizer", "model": mcfg.to_dict(), "data": data_id, "loss": cfg.loss,
                    "soft_steps": cfg.soft_steps}

        def collate(items: list) -> torch.Tensor:
            return torch.stack([it["video"] for it in items])

        def step_fn(step: int, video: torch.Tensor):
            loss, quality = model(video.to(env.device, non_blocking=True), step < cfg.soft_steps)
            return loss, {"psnr": quality}

        train_config = {"kind": "tokenizer", "model": mcfg.to_dict(), "out_dir": str(cfg.out_dir),
                        "loss": cfg.loss, "soft_steps": cfg.soft_steps, "data": data_id,
                        "loop": cfg.loop.to_dict()}
        run_loop(model, step_fn, cfg.loop, env,
                 batches=step_batches(dataset, cfg.loop, env, collate, cfg.num_workers),
                 out_dir=Path(cfg.out_dir), identity=identity,
                 export=functools.partial(_export, mcfg), train_config=train_config)
        return unwrap(model).tokenizer
    finally:
        shutdown(env)


def _export(mcfg: TokenizerConfig, state_dict: dict, out: Path) -> None:
    tok = VideoTokenizer(mcfg)
    tok.load_state_dict({k.removeprefix("tokenizer."): v for k, v in state_dict.items()})
    export_native(tok, out)
