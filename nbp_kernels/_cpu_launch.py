"""What the CPU linear kernels' launchers share: rows in, rows out, the empty cases, the
activation codes of their ``act`` argument, and the checks of the optional LayerNorm
prologue (``norm``) and residual epilogue (``residual``)."""
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


def checked_norm(norm, in_features: int):
    """``norm`` as (weight, bias, eps) or None, or a ValueError naming the part that is
    wrong. norm: None, or (weight, bias, eps) of a LayerNorm over the last dimension of x,
    weight and bias float32 CPU [in_features] or None (1 and 0), eps a finite float >= 0:
    the kernels normalise each row of x first (``F.layer_norm``, within float32 rounding)."""
    if norm is None:
        return None
    if not isinstance(norm, (tuple, list)) or len(norm) != 3:
        raise ValueError(f"norm: expected None or (weight, bias, eps), got {type(norm).__name__}")
    weight, bias, eps = norm
    for name, t in (("norm weight", weight), ("norm bias", bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"norm: {name} expected float32 on the CPU or None, got "
                             f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != (in_features,):
            raise ValueError(f"norm: {name} expected shape ({in_features},) (in_features), got "
                             f"{tuple(t.shape)}")
        if t.requires_grad:
            raise ValueError(f"norm: inference only; {name} requires grad (detach it)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < float("inf"):
        raise ValueError(f"norm: eps expected a finite float >= 0, got {eps!r}")
    return weight, bias, float(eps)


def checked_residual(residual: torch.Tensor | None, x: torch.Tensor, out_features: int) -> None:
    """A ValueError naming ``residual`` unless it is None or float32 CPU [..., out_features]
    with x's leading dimensions."""
    if residual is None:
        return
    want = (*x.shape[:-1], out_features)
    if not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 \
            or residual.device.type != "cpu":
        raise ValueError(f"residual: expected float32 on the CPU or None, got "
                         f"{getattr(residual, 'dtype', type(residual).__name__)}")
    if tuple(residual.shape) != want:
        raise ValueError(f"residual: expected shape {want} (x's rows, out_features), got "
                         f"{tuple(residual.shape)}")
    if residual.requires_grad:
        raise ValueError("residual: inference only; pass a tensor that does not require grad")


def norm_args(norm) -> tuple[int, int | None, int | None, float]:
    """The C entry points' (norm, gamma, beta, eps) for a checked ``norm`` (contiguous)."""
    if norm is None:
        return 0, None, None, 0.0
    w, b, eps = norm
    return 1, None if w is None else w.data_ptr(), None if b is None else b.data_ptr(), eps


def apply_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """x, or ``F.layer_norm`` of it over the last dimension for a norm (weight, bias, eps)."""
    return x if norm is None else F.layer_norm(x, x.shape[-1:], norm[0], norm[1], norm[2])


def apply_torch(product: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, norm,
                act: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """act(product(layer_norm(x))) + residual in torch (the paths that do not run a kernel)."""
    y = apply_act(product(apply_norm(x, norm)), act)
    return y if residual is None else y + residual


def run_rows(x: torch.Tensor, out_features: int, bias: torch.Tensor | None,
             kernel: Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor | None], None],
             act: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [..., K] -> float32 [..., out_features] through ``kernel(x2, M, K, y, r2)``,
    which writes y [M, out_features] = act(x2 @ W.T + bias) + r2 from x2 [M, K] and
    r2 [M, out_features] or None (contiguous; any LayerNorm of x2 is the kernel's) and is
    called only when there are rows and inputs: without inputs each row is act(bias) (or
    act(0)) + its residual."""
    M, K = x.shape[:-1].numel(), x.shape[-1]
    y = torch.empty(M, out_features, dtype=torch.float32)
    r2 = None if residual is None else residual.reshape(M, out_features).contiguous()
    if M and K:
        kernel(x.reshape(M, K).contiguous(), M, K, y, r2)
    elif M:
        y = apply_act(y.copy_(bias.expand(M, -1) if bias is not None else torch.zeros_like(y)), act)
        y = y if r2 is None else y + r2
    return y.view(*x.shape[:-1], out_features)


def check_rc(what: str, rc: int) -> None:
    """A RuntimeError naming ``what`` for a C entry point's nonzero return code (-2: out of
    memory); nothing for 0."""
    if rc != 0:
        raise RuntimeError(f"{what} failed with code {rc}" + (": out of memory" if rc == -2 else ""))


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()
