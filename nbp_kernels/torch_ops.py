"""The ``torch`` backend: vectorised PyTorch (SDPA), no host synchronisation.

The CPU default and the GPU fallback of every op. Same semantics as
``reference.py``, but without Python loops over the batch so it stays usable
inside a captured graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import nbp_mask
from .registry import register


def block_causal_attention(q, k, v, *, block_size, cond_len=0, hybrid=False, scale=None):
    """q, k, v: [B, H, S, D] -> [B, H, S, D]; differentiable."""
    mask = nbp_mask(q.shape[2], k.shape[2], block_size=block_size, cond_len=cond_len,
                    hybrid=hybrid, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _host_lens(seq_lens: torch.Tensor) -> list[int] | None:
    """seq_lens as Python ints where reading them costs nothing (a CPU tensor,
    eager); None on a GPU or while compiling, where it would synchronise or
    break the graph."""
    if seq_lens.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return seq_lens.tolist()


def _block_index(seq_lens: torch.Tensor, L: int, H: int, D: int) -> torch.Tensor:
    pos = seq_lens.long()[:, None] + torch.arange(L, device=seq_lens.device)   # [B, L]
    return pos[:, None, :, None].expand(-1, H, -1, D)                            # [B, H, L, D]


def kv_append_(k_cache, v_cache, k_new, v_new, seq_lens):
    """Scatter the block into the caches at ``seq_lens[b]`` (in place)."""
    _append(k_cache, v_cache, k_new, v_new, seq_lens, _host_lens(seq_lens))


def _append(k_cache, v_cache, k_new, v_new, seq_lens, lens: list[int] | None) -> None:
    """``kv_append_`` with ``lens = _host_lens(seq_lens)`` already read."""
    B, H, L, D = k_new.shape
    if lens and all(n == lens[0] for n in lens):   # one slice copy is far cheaper than scatter_ on CPU
        k_cache[:, :, lens[0]:lens[0] + L].copy_(k_new)
        v_cache[:, :, lens[0]:lens[0] + L].copy_(v_new)
        return
    idx = _block_index(seq_lens, L, H, D)
    k_cache.scatter_(2, idx, k_new.to(k_cache.dtype))
    v_cache.scatter_(2, idx, v_new.to(v_cache.dtype))


def block_decode_attention(q, k_cache, v_cache, seq_lens, *, k_new=None, v_new=None, scale=None):
    """q: [B, H, L, D] against caches [B, H, M, D]; keys ``< seq_lens[b] + L`` visible."""
    lens = _host_lens(seq_lens)
    if k_new is not None:
        _append(k_cache, v_cache, k_new, v_new, seq_lens, lens)
    L, M = q.shape[2], k_cache.shape[2]
    k, v = k_cache.to(q.dtype), v_cache.to(q.dtype)
    if lens and all(n + L == M for n in lens):
        # every cached key is visible (FastGenerator passes the exact length):
        # SDPA without a mask takes a faster CPU kernel than with one
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    visible = torch.arange(M, device=q.device)[None, :] < (seq_lens.long()[:, None] + L)  # [B, M]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scale)


def call_module(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The ``torch`` linear: the module's own forward (``F.linear``)."""
    return module(x)


def linear(model: torch.nn.Module):
    """The ``linear`` op's torch fallback: nothing to prepare, ``call_module`` for every linear."""
    return call_module


register(("block_causal_attention", "block_decode_attention", "kv_append_", "linear"), "torch",
         "nbp_kernels.torch_ops")
