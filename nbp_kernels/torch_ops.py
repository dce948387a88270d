"""The ``torch`` backend: vectorised PyTorch (SDPA), no host synchronisation.

The CPU default and the GPU fallback of every op. Same semantics as
``reference.py``, but without Python loops over the batch so it stays usable
inside a captured graph.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .reference import nbp_mask
from .registry import register


# Query rows per SDPA call on the CPU: each chunk reads only the keys its rows can see.
# One 512-token layer in blocks of 16 (6 heads x 64, additive mask, 2-core AVX-512 VM,
# interleaved medians): 1.73 ms at 256 rows, 1.62 at 128, 1.58 at 64, 1.69 at 32
# (the calls' own cost); one call over the whole mask took 2.71 ms.
CPU_QUERY_CHUNK = 64


@functools.lru_cache(maxsize=16)
def _mask_plan(q_len: int, kv_len: int, block_size: int, cond_len: int, hybrid: bool,
               device: torch.device, dtype: torch.dtype = torch.bool):
    """(the NBP mask [q_len, kv_len], ((q0, q1, keys), ...) or None): built once per shape,
    not once per layer (0.4 ms each at 512 x 512). On the CPU the mask is additive in
    ``dtype`` (0 visible, -inf hidden; a float query's SDPA converted a boolean one at every
    call: 12% of a 512-token layer's attention) and, beyond one chunk of
    ``CPU_QUERY_CHUNK`` rows, each chunk of rows reads the keys up to its last visible one."""
    mask = nbp_mask(q_len, kv_len, block_size=block_size, cond_len=cond_len, hybrid=hybrid,
                    device=device)
    if device.type != "cpu":
        return mask, None
    chunks = None
    if q_len > CPU_QUERY_CHUNK:
        chunks = []
        for q0 in range(0, q_len, CPU_QUERY_CHUNK):
            q1 = min(q_len, q0 + CPU_QUERY_CHUNK)
            seen = mask[q0:q1].any(0).nonzero()
            chunks.append((q0, q1, int(seen[-1]) + 1 if len(seen) else 1))
        chunks = tuple(chunks)
    if dtype.is_floating_point:
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))
    return mask, chunks


def block_causal_attention(q, k, v, *, block_size, cond_len=0, hybrid=False, scale=None):
    """q, k, v: [B, H, S, D] -> [B, H, S, D]; differentiable. q may also hold only the last
    Sq < S positions (``last_rows_attention``)."""
    if torch.compiler.is_compiling():
        mask = nbp_mask(q.shape[2], k.shape[2], block_size=block_size, cond_len=cond_len,
                        hybrid=hybrid, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    mask, chunks = _mask_plan(q.shape[2], k.shape[2], block_size, cond_len, hybrid, q.device,
                              q.dtype)
    if chunks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, :n], v[:, :, :n],
                                                     attn_mask=mask[q0:q1, :n], scale=scale)
                      for q0, q1, n in chunks], dim=2)


def last_rows_attention(q, k, v, *, block_size, cond_len=0, hybrid=False, scale=None):
    """The NBP attention of the last Sq of S positions: q [B, H, Sq, D], k, v [B, H, S, D]
    -> [B, H, Sq, D], the last Sq rows of ``block_causal_attention`` over all S queries
    (``reference.nbp_mask`` places the queries last). A prefill's last layer needs only
    the positions whose logits are used; torch SDPA, on any device."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] > k.shape[2] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"q: expected [B, H, Sq, D] with Sq <= S of k [B, H, S, D], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    return block_causal_attention(q, k, v, block_size=block_size, cond_len=cond_len,
                                  hybrid=hybrid, scale=scale)


def _host_lens(seq_lens: torch.Tensor) -> list[int] | None:
    """seq_lens as Python ints where reading them costs nothing (a CPU tensor,
    eager); None on a GPU or while compiling, where it would synchronise or
    break the graph."""
    if seq_lens.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return seq_lens.tolist()


def _block_targets(seq_lens: torch.Tensor, L: int, M: int, H: int, D: int):
    """Where the rows of a new block go, computed on the device (no host sync).

    Position ``seq_lens[b] + l`` is written when ``seq_lens[b] >= 0`` and it is
    below ``M``, the rule of the CUDA kernel (and of the Triton one for
    non-negative lengths), so an unchecked overflow is clipped at ``M`` and a
    negative length writes nothing. ``scatter_`` cannot skip an index, so a row
    that must not be written is sent to ``slot = clamp(position, 0, M - 1)``
    with the value that slot ends up holding anyway (its own new row if the
    block covers it, else its old value): all writes to a slot agree, whatever
    order ``scatter_`` applies duplicates in.

    Returns (slot, covered, src), each [B, H, L, D]: slot int64 cache index,
    covered bool (slot is inside the block), src int64 row of the new block.
    """
    s = seq_lens.long()[:, None]                                   # [B, 1]
    slot = (s + torch.arange(L, device=seq_lens.device)).clamp(0, M - 1)   # [B, L]
    covered = (s >= 0) & (slot >= s)   # slot < s + L holds whenever s >= 0
    src = (slot - s).clamp(0, L - 1)

    def grid(t):
        return t[:, None, :, None].expand(-1, H, -1, D)
    return grid(slot), grid(covered), grid(src)


def kv_append_(k_cache, v_cache, k_new, v_new, seq_lens):
    """Scatter the block into the caches at ``seq_lens[b]`` (in place); nothing outside
    the block or the cache is written (``_block_targets``), k and v alike."""
    _append(k_cache, v_cache, k_new, v_new, seq_lens, _host_lens(seq_lens))


def _append(k_cache, v_cache, k_new, v_new, seq_lens, lens: list[int] | None) -> None:
    """``kv_append_`` with ``lens = _host_lens(seq_lens)`` already read."""
    B, H, L, D = k_new.shape
    M = k_cache.shape[2]
    if M == 0 or L == 0:
        return
    if lens and all(n == lens[0] for n in lens) and 0 <= lens[0] <= M - L:
        # one slice copy is far cheaper than scatter_ on CPU
        k_cache[:, :, lens[0]:lens[0] + L].copy_(k_new)
        v_cache[:, :, lens[0]:lens[0] + L].copy_(v_new)
        return
    slot, covered, src = _block_targets(seq_lens, L, M, H, D)
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        rows = torch.where(covered, new.to(cache.dtype).gather(2, src), cache.gather(2, slot))
        cache.scatter_(2, slot, rows)


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
register(("keep_threshold", "draw_kept"), "torch", "nbp_kernels.sample_torch")
