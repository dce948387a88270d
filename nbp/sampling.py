"""Sampling: temperature, classifier-free guidance, top-k, top-p, multinomial.

One batched implementation for every row (B x L tokens in one call), with the
published semantics: logits / temperature -> CFG mix -> top-k (ties with the
k-th value kept) -> top-p (smallest prefix of the sorted distribution whose
mass reaches p, the crossing token included) -> softmax -> multinomial.
Greedy decoding is the argmax of the mixed logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingParams", "cfg_mix", "cfg_weight", "filter_logits", "sample_logits"]


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (raises ValueError naming the argument)."""

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None
    cfg_schedule: str = "constant"   # "constant" | "linear" (scale x step index)

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected a number > 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k: expected None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected None or a number in (0, 1], got {self.top_p!r}")
        if self.cfg_scale is not None and self.cfg_scale < 0:
            raise ValueError(f"cfg_scale: expected None or a number >= 0, got {self.cfg_scale!r}")
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule: expected 'constant' or 'linear', got {self.cfg_schedule!r}")


def cfg_weight(params: SamplingParams, step: int | torch.Tensor):
    """Guidance weight t at decode step ``step`` (0-based)."""
    return params.cfg_scale * (step if params.cfg_schedule == "linear" else 1)


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, t) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, the published guidance."""
    return (1 + t) * cond - t * uncond


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Mask with -inf every token outside top-k, then outside top-p. logits: [N, V] float."""
    logits = logits.float()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()   # keep the token that crosses p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row. logits: [N, V] (already temperature-scaled and
    CFG-mixed) -> int64 [N]."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params.top_k, params.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
