"""A generator that works the way the published sampler does; used only as a speed baseline.

Our own code (no published code is copied), reproducing the published
sampler's costs on our model's weights:

* the key/value cache is a Python list of per-step tensors, concatenated into
  one tensor at every step and again with the new keys in every layer
  (``torch.cat``), so each step copies the whole past;
* the vocabulary head runs over every position fed, including the whole
  prefix at the first step;
* top-k / top-p filtering and the multinomial draw run one token at a time in
  a Python loop over the L tokens of a block.

Greedy output equals ``nbp.reference.generate_tokens`` for modes "nbp" and
"ntp" without a condition (checked in tests/test_generate.py); that is all it
supports (no CFG, no hybrid layout).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nbp.model import NBPTransformer
from nbp.sampling import filter_logits
from nbp_kernels.reference import nbp_mask

__all__ = ["generate_tokens"]


def _forward_with_past(model: NBPTransformer, ids: torch.Tensor, past: list[torch.Tensor],
                       past_len: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids int64 [B, T] after ``past_len`` cached positions -> (logits [B, T, V] for every
    position, this step's keys/values [n_layer, 2, B, H, T, D])."""
    T = ids.shape[1]
    cached = torch.cat(past, dim=-2) if past else None      # [n_layer, 2, B, H, past_len, D]
    mask = None if cached is not None else nbp_mask(T, block_size=block_size, device=ids.device)
    presents = []

    def attend(q, k, v, i):
        presents.append(torch.stack((k, v)))
        if cached is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        k = torch.cat((cached[i, 0], k), dim=-2)
        v = torch.cat((cached[i, 1], v), dim=-2)
        return F.scaled_dot_product_attention(q, k, v)     # the block sees all cached keys

    positions = torch.arange(past_len, past_len + T, device=ids.device)
    x = model.run_layers(model.embed(ids, positions), attend)
    return model.logits(x), torch.stack(presents)


@torch.no_grad()
def generate_tokens(model: NBPTransformer, input_ids: torch.Tensor, num_new_tokens: int, *,
                    mode: str = "nbp", do_sample: bool = True, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """input_ids int64 [B, S] (no condition) -> new ids int64 [B, num_new_tokens]."""
    if mode not in ("nbp", "ntp"):
        raise ValueError(f"mode: the baseline supports 'nbp' and 'ntp', got {mode!r}")
    L = model.config.block_size if mode == "nbp" else 1
    if num_new_tokens % L or (input_ids.shape[1] % L):
        raise ValueError(f"num_new_tokens and the prefix must be multiples of L={L}")
    x, past, past_len, out = input_ids.long(), [], 0, []
    for _ in range(num_new_tokens // L):
        logits, present = _forward_with_past(model, x, past, past_len, L)
        past.append(present)
        past_len += x.shape[1]
        logits = logits[:, -L:].float() / temperature
        if not do_sample:
            x = logits.argmax(dim=-1)
        else:
            x = torch.zeros(x.shape[0], L, dtype=torch.long, device=x.device)
            for i in range(L):   # one token at a time, as published
                probs = torch.softmax(filter_logits(logits[:, i], top_k, top_p), dim=-1)
                x[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        out.append(x)
    return torch.cat(out, dim=1)
