"""Block shapes: the fixed permutation from raster order to block-major order.

A latent video is a grid [t, h, w]; a block shape (bt, bh, bw) tiles it. The
model only ever sees contiguous blocks of L = bt*bh*bw tokens, so codes are
reordered on the way in (training and generation) and back before decoding.
Row blocks (1, 1, w) are the identity permutation.
"""
from __future__ import annotations

import torch

__all__ = ["block_order", "to_block_order", "from_block_order"]


def block_order(latent_shape, block_shape) -> torch.Tensor:
    """perm (int64 [t*h*w]) with ``block_major = raster[..., perm]``."""
    (t, h, w), (bt, bh, bw) = latent_shape, block_shape
    for g, b, axis in zip((t, h, w), (bt, bh, bw), "thw"):
        if b < 1 or g % b:
            raise ValueError(f"block_shape {tuple(block_shape)} does not tile latent_shape "
                             f"{tuple(latent_shape)}: {axis} = {g} is not divisible by {b}")
    grid = torch.arange(t * h * w).view(t // bt, bt, h // bh, bh, w // bw, bw)
    return grid.permute(0, 2, 4, 1, 3, 5).reshape(-1)


def to_block_order(codes: torch.Tensor, block_shape) -> torch.Tensor:
    """codes [B, t, h, w] -> block-major tokens [B, t*h*w]."""
    perm = block_order(codes.shape[1:], block_shape).to(codes.device)
    return codes.flatten(1)[:, perm]


def from_block_order(tokens: torch.Tensor, latent_shape, block_shape) -> torch.Tensor:
    """Inverse of ``to_block_order``: tokens [B, t*h*w] -> codes [B, t, h, w]."""
    perm = block_order(latent_shape, block_shape).to(tokens.device)
    out = torch.empty_like(tokens)
    out[:, perm] = tokens
    return out.view(tokens.shape[0], *latent_shape)
