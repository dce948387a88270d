"""Finite scalar quantization (FSQ), as used by the published MAGVIT-v2 tokenizer.

Each latent channel d is squashed into ``levels[d]`` integer values; a latent
vector's code index is the mixed-radix number of its per-channel digits:
``index = sum_d digit_d * basis_d`` with ``basis = cumprod([1] + levels[:-1])``
(``[1, 8, 64, 512, 2560, 12800]`` for the published levels ``[8, 8, 8, 5, 5, 5]``).

Vocabulary used in this module:

* **latent** ``z``: the encoder's continuous output, float, channel-last ``[..., d]``.
* **code** ``zhat``: a quantized latent, normalised to [-1, 1] (what the decoder
  consumes); float32 ``[..., d]``.
* **digit**: ``round(bound(z)) + levels // 2``, an int in ``[0, levels[d])``.
* **index**: the int64 code index in ``[0, prod(levels))``, what the generator sees.

The arithmetic follows the published quantizer bit for bit (float32; the
``bound`` uses ``eps = 1e-3`` and the half-step shift ``tan(offset / half_l)``
for even levels), so indices computed here equal the published ones.
The module has no parameters and no buffers: the level tables are built on
the input's device per call, so a tokenizer can be constructed on the
``meta`` device and filled from a checkpoint.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

__all__ = ["FSQ"]


class FSQ(nn.Module):
    """Finite scalar quantizer with the given per-channel ``levels`` (each >= 2)."""

    def __init__(self, levels):
        super().__init__()
        levels = tuple(int(x) for x in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"levels: expected a non-empty sequence of ints >= 2, got {levels!r}")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.basis = tuple(math.prod(levels[:i]) for i in range(len(levels)))

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, codebook_size={self.codebook_size}"

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """levels (int64 [d]), half widths levels // 2 (int64 [d]), basis (int64 [d])."""
        levels = torch.tensor(self.levels, dtype=torch.int64, device=device)
        basis = torch.tensor(self.basis, dtype=torch.int64, device=device)
        return levels, levels // 2, basis

    def _check_last_dim(self, name: str, t: torch.Tensor) -> None:
        if t.dim() < 1 or t.shape[-1] != self.dim:
            raise ValueError(f"{name}: expected a tensor [..., {self.dim}] (one entry per FSQ level), "
                             f"got shape {tuple(t.shape)}")

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Squash latents ``z`` [..., d] into (-levels/2, levels/2): float32 [..., d]."""
        self._check_last_dim("z", z)
        levels = torch.tensor(self.levels, dtype=torch.float32, device=z.device)
        half_l = (levels - 1) * (1 - eps) / 2
        # Even level counts have no centre value: shift by half a step so that
        # rounding yields exactly `levels` distinct integers.
        offset = torch.where(torch.remainder(levels, 2) == 0, 0.5, 0.0)
        shift = (offset / half_l).tan()
        return (z.float() + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [..., d] -> codes on the FSQ grid in [-1, 1], float32 [..., d].

        Rounding uses a straight-through gradient, so this is trainable.
        """
        b = self.bound(z)
        q = b + (b.round() - b).detach()
        _, half, _ = self._tables(z.device)
        return q / half

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [..., d] (float, on the grid) -> indices int64 [...].

        Raises ValueError when a code lies off the grid or outside [-1, 1].
        """
        self._check_last_dim("codes", codes)
        levels, half, basis = self._tables(codes.device)
        scaled = codes.float() * half + half
        digits = scaled.round()
        if codes.numel():
            if (scaled - digits).abs().max().item() > 1e-3:
                raise ValueError("codes: values are not on the FSQ grid (expected (digit - l//2) / (l//2) "
                                 f"per channel for levels {list(self.levels)})")
            bad = (digits < 0) | (digits >= levels)
            if bad.any().item():
                raise ValueError(f"codes: values outside the FSQ range for levels {list(self.levels)}")
        return (digits.long() * basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (int) [...] -> codes float32 [..., d] in [-1, 1].

        Raises ValueError for a float tensor or an index outside [0, codebook_size).
        """
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices: expected an integer tensor, got {indices.dtype}")
        if indices.numel():
            lo, hi = indices.min().item(), indices.max().item()
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"indices: expected values in [0, {self.codebook_size}), "
                                 f"got min {lo}, max {hi}")
        levels, half, basis = self._tables(indices.device)
        digits = (indices.long().unsqueeze(-1) // basis) % levels
        return (digits - half) / half

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel-first latents [B, d, *grid] -> (codes float32 [B, d, *grid], indices int64 [B, *grid])."""
        if z.dim() < 2 or z.shape[1] != self.dim:
            raise ValueError(f"z: expected [batch, {self.dim}, ...], got shape {tuple(z.shape)}")
        codes = self.quantize(z.movedim(1, -1))
        _, half, basis = self._tables(z.device)
        # Digits straight from the quantized values; same integers as codes_to_indices.
        indices = ((codes.detach() * half + half).round().long() * basis).sum(dim=-1)
        return codes.movedim(-1, 1), indices
