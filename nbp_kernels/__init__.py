"""nbp_kernels: the attention, KV-cache, linear and sampling ops of the NBP engine.

Public ops (semantics in ``nbp_kernels.reference``):

* ``block_causal_attention(q, k, v, *, block_size, cond_len=0, hybrid=False, scale=None, backend="auto")``
* ``block_decode_attention(q, k_cache, v_cache, seq_lens, *, k_new=None, v_new=None, scale=None, backend="auto", check_bounds=True)``
* ``kv_append_(k_cache, v_cache, k_new, v_new, seq_lens, *, backend="auto", check_bounds=True)``

Which backend runs an op is decided by ``nbp_kernels.registry`` (``resolve``,
``status_table``); ``nbp info`` prints that table. The registry also holds
the host ops of ``FastGenerator``: ``linear`` (``cpu``: the C kernel of
``nbp_kernels.packed_linear``) and the sampler's ``keep_threshold`` /
``draw_kept`` (``cpu``: ``nbp_kernels.sample_cpu``), each with a torch fallback.

These functions validate their arguments, once, before any kernel launch;
the implementations behind them do not. ``check_bounds`` reads ``seq_lens``
on the host (one synchronisation) to raise on cache overflow; callers that
have already checked capacity (the generator, inside a captured decode loop)
pass ``check_bounds=False``.
"""
from __future__ import annotations

from . import reference
from ._validate import check_append, check_attention, check_decode
from .reference import nbp_mask
from .registry import available_backends, backend_status, resolve, status_table

__all__ = [
    "block_causal_attention", "block_decode_attention", "kv_append_",
    "nbp_mask", "available_backends", "backend_status", "resolve", "status_table", "reference",
]


def block_causal_attention(q, k, v, *, block_size: int, cond_len: int = 0, hybrid: bool = False,
                           scale: float | None = None, backend: str = "auto"):
    """Attention under the NBP mask. q, k, v: [B, H, S, D] (fp32/fp16/bf16) -> [B, H, S, D].

    Differentiable on every backend.
    """
    check_attention(q, k, v, block_size, cond_len)
    fn = resolve("block_causal_attention", backend, device=q.device, dtype=q.dtype,
                 head_dim=q.shape[-1], block_size=block_size)
    return fn(q, k, v, block_size=block_size, cond_len=cond_len, hybrid=hybrid, scale=scale)


def block_decode_attention(q, k_cache, v_cache, seq_lens, *, k_new=None, v_new=None,
                           scale: float | None = None, backend: str = "auto",
                           check_bounds: bool = True):
    """One decode step. q: [B, H, L, D]; caches [B, H, M, D]; seq_lens int32 [B] -> [B, H, L, D].

    With ``k_new``/``v_new`` ([B, H, L, D]) they are written into the caches at
    ``seq_lens[b]`` first (in place); the caller advances ``seq_lens``.
    """
    check_decode(q, k_cache, v_cache, seq_lens, k_new, v_new, check_bounds)
    fn = resolve("block_decode_attention", backend, device=q.device, dtype=q.dtype,
                 head_dim=q.shape[-1], block_size=q.shape[2])
    return fn(q, k_cache, v_cache, seq_lens, k_new=k_new, v_new=v_new, scale=scale)


def kv_append_(k_cache, v_cache, k_new, v_new, seq_lens, *, backend: str = "auto",
               check_bounds: bool = True) -> None:
    """Write k_new/v_new ([B, H, L, D]) into the caches ([B, H, M, D]) at ``seq_lens[b]``, in place."""
    check_append(k_cache, v_cache, k_new, v_new, seq_lens, check_bounds)
    fn = resolve("kv_append_", backend, device=k_new.device, dtype=k_new.dtype,
                 head_dim=k_new.shape[-1], block_size=k_new.shape[2])
    fn(k_cache, v_cache, k_new, v_new, seq_lens)
