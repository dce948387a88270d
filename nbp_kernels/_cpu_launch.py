"""What the CPU linear kernels' launchers share: rows in, rows out, and the empty cases."""
from __future__ import annotations

from typing import Callable

import torch


def run_rows(x: torch.Tensor, out_features: int, bias: torch.Tensor | None,
             kernel: Callable[[torch.Tensor, int, int, torch.Tensor], None]) -> torch.Tensor:
    """x float32 [..., K] -> float32 [..., out_features] through ``kernel(x2, M, K, y)``,
    which writes y [M, out_features] from x2 [M, K] (contiguous) and is called only when
    there are rows and inputs: without inputs each row is the bias (or zeros)."""
    M, K = x.shape[:-1].numel(), x.shape[-1]
    y = torch.empty(M, out_features, dtype=torch.float32)
    if M and K:
        kernel(x.reshape(M, K).contiguous(), M, K, y)
    elif M:
        y.copy_(bias.expand(M, -1) if bias is not None else torch.zeros_like(y))
    return y.view(*x.shape[:-1], out_features)


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
