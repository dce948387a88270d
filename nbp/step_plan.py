"""What every generator agrees on: the step plan of each mode and its input checks.

Modes (docs/design.md):

* ``nbp``: L = config.block_size tokens per step; the prefix after the
  condition must be whole blocks (position p predicts p + L).
* ``ntp``: one token per step under a causal mask (any model; speed ablations).
* ``hybrid``: input is condition + begin-of-video; the first L video tokens
  come one per step (causal), then the L-1 middle-bos ids 1..L-1 are appended
  after z_{L-1} and every later step predicts a block of L.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TransformerConfig

MODES = ("nbp", "ntp", "hybrid")

__all__ = ["MODES", "StepPlan", "plan_steps", "check_generation_inputs"]


@dataclass(frozen=True)
class StepPlan:
    """block_size: L, the block size of the attention mask; hybrid: hybrid mask layout;
    tokens: number of tokens sampled at each step; filler_after: the step after
    which the middle-bos ids are appended (-1: never)."""

    mode: str
    block_size: int
    hybrid: bool
    tokens: tuple[int, ...]
    filler_after: int

    def fillers(self, batch: int, device) -> torch.Tensor:
        """The middle-bos ids 1..L-1, int64 [batch, L-1]."""
        return torch.arange(1, self.block_size, device=device).expand(batch, -1)


def plan_steps(config: TransformerConfig, mode: str, num_new_tokens: int) -> StepPlan:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    L = config.block_size
    if not isinstance(num_new_tokens, int) or num_new_tokens < 1:
        raise ValueError(f"num_new_tokens: expected a positive int, got {num_new_tokens!r}")
    if mode == "ntp":
        return StepPlan(mode, 1, False, (1,) * num_new_tokens, -1)
    if num_new_tokens % L or (mode == "hybrid" and num_new_tokens < L):
        raise ValueError(f"num_new_tokens: expected a positive multiple of the block size L={L} "
                         f"in mode {mode!r}, got {num_new_tokens}")
    if mode == "nbp":
        return StepPlan(mode, L, False, (L,) * (num_new_tokens // L), -1)
    if not config.hybrid:
        raise ValueError("mode: 'hybrid' needs a model trained with the hybrid layout "
                         "(config.hybrid=True)")
    tokens = (1,) * L + (L,) * (num_new_tokens // L - 1)
    return StepPlan(mode, L, True, tokens, L - 1 if L > 1 else -1)


def check_generation_inputs(config: TransformerConfig, input_ids: torch.Tensor, plan: StepPlan,
                            cond_len: int, use_cfg: bool) -> None:
    """Raise ValueError naming the argument when the request cannot be served."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
            torch.int64, torch.int32):
        raise ValueError("input_ids: expected an int64 tensor [batch, seq]")
    B, S = input_ids.shape
    if B < 1 or S < 1:
        raise ValueError(f"input_ids: expected a non-empty [batch, seq] tensor, got {tuple(input_ids.shape)}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        raise ValueError(f"input_ids: ids must lie in [0, {config.vocab_size}), got [{lo}, {hi}]")
    if not isinstance(cond_len, int) or not 0 <= cond_len < S:
        raise ValueError(f"cond_len: expected an int in [0, seq={S}) (at least one token after the "
                         f"condition), got {cond_len!r}")
    if plan.mode == "nbp" and (S - cond_len) % plan.block_size:
        raise ValueError(f"input_ids: in mode 'nbp' the tokens after the condition must be whole "
                         f"blocks of L={plan.block_size}, got {S - cond_len}")
    if plan.mode == "hybrid" and S != cond_len + 1:
        raise ValueError(f"input_ids: in mode 'hybrid' pass the condition ({cond_len} tokens) "
                         f"followed by the begin-of-video id, got {S} tokens")
    # Every step feeds the previous step's tokens (and the hybrid fillers); the last
    # step's tokens are drawn but never fed, as in training, whose inputs stop L
    # tokens before the end (so max_seq_len = the training input length suffices).
    fed = S + sum(plan.tokens[1:])
    if fed > config.max_seq_len:
        raise ValueError(f"num_new_tokens: the model would read {fed} positions (the input and "
                         f"every new token but the last step's), more than its max_seq_len "
                         f"{config.max_seq_len}")
    if use_cfg and (cond_len == 0 or cond_len != config.cond_len):
        raise ValueError(f"cfg_scale: guidance replaces the {config.cond_len} condition tokens by "
                         f"uncond_embedding, so cond_len must equal {config.cond_len} (> 0), got {cond_len}")
