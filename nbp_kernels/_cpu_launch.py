"""What the CPU linear kernels' launchers share: rows in, rows out, the empty cases, and
the activation codes of their ``act`` argument."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# act -> the C entry points' code (cpu/panel_cols.h): None, or "gelu", the exact GELU
# (torch.nn.GELU(approximate="none")) applied to each output in the kernel's epilogue.
ACTS = {None: 0, "gelu": 1}


def checked_act(act) -> int:
    """The C code of ``act``, or a ValueError naming it."""
    if not (act is None or isinstance(act, str)) or act not in ACTS:
        raise ValueError(f"act: expected None or 'gelu', got {act!r}")
    return ACTS[act]


def apply_act(y: torch.Tensor, act: str | None) -> torch.Tensor:
    """``act`` applied in torch (the paths that do not run a kernel)."""
    return y if act is None else F.gelu(y)


def run_rows(x: torch.Tensor, out_features: int, bias: torch.Tensor | None,
             kernel: Callable[[torch.Tensor, int, int, torch.Tensor], None],
             act: str | None = None) -> torch.Tensor:
    """x float32 [..., K] -> float32 [..., out_features] through ``kernel(x2, M, K, y)``,
    which writes y [M, out_features] = act(x2 @ W.T + bias) from x2 [M, K] (contiguous)
    and is called only when there are rows and inputs: without inputs each row is
    act(bias) (or act(0))."""
    M, K = x.shape[:-1].numel(), x.shape[-1]
    y = torch.empty(M, out_features, dtype=torch.float32)
    if M and K:
        kernel(x.reshape(M, K).contiguous(), M, K, y)
    elif M:
        y = apply_act(y.copy_(bias.expand(M, -1) if bias is not None else torch.zeros_like(y)), act)
    return y.view(*x.shape[:-1], out_features)


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
