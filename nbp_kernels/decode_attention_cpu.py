"""``block_decode_attention`` on the CPU: ``cpu/decode_attention.c`` (float32, append fused),
and ``block_causal_attention`` over whole blocks with the same kernel (a prefill).

The ``cpu`` backend of the decode step: the new block written into the caches and
L queries per (sequence, head) attending to the visible cached positions, in one
call with one pass over each cache row (the kernel's comment says how). Semantics:
``reference.block_decode_attention`` and the ``torch`` backend's rules for lengths
the public wrapper accepts unchecked (``check_bounds=False``): position
``seq_lens[b] + l`` is written when ``seq_lens[b] >= 0`` and it is below M; keys
``< seq_lens[b] + L`` (capped at M) are visible; a row without a visible key is zeros.

Compiled at first use (``nbp_kernels.cpu_build``) for the ISA ``cpu_isa()``
picks; ``is_available()`` says which, or why none (then ``auto`` runs the
``torch`` backend). Measurements: ``benchmarks/bench_block_decode_attention.py``.
"""
from __future__ import annotations

import ctypes
import functools
import math
import threading

import torch

from . import torch_ops
from .cpu_build import load, usable

__all__ = ["block_decode_attention", "block_causal_attention", "is_available", "splits_for"]

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
CHUNK = 64   # keys per online-softmax step (decode_attention.c); a split is whole chunks
# Fewer query rows take the torch backend: the kernel's vector lanes are query rows, so
# for 1 or 2 rows most of its score work is padding, and SDPA was faster (K600 shape,
# 2 threads, 2-core AVX-512 VM, medians, SDPA against the kernel: 1 row 111 us against
# 132, 2 rows 106 against 128, 4 rows 149 against 147, 16 rows 212 against 159).
MIN_ROWS = 4


@functools.lru_cache(maxsize=None)
def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.nbp_decode_attention.restype = None
    lib.nbp_decode_attention.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64,
                                         _I64, ctypes.c_float, _I64, ctypes.c_int, _P, _P, _P]
    lib.nbp_decode_attention_work.restype = _I64
    lib.nbp_decode_attention_work.argtypes = [_I64, _I64]
    return lib


_scratch = threading.local()   # per calling thread: a call's scratch is its own while it runs


def _work(lib: ctypes.CDLL, threads: int, L: int, D: int) -> torch.Tensor:
    """The kernel's per-thread scratch for (threads, L, D), kept for the next call of the
    same shape (not an allocation per layer per step)."""
    key = (lib._name, threads, L, D)
    if getattr(_scratch, "key", None) != key:
        _scratch.work = torch.empty(threads, lib.nbp_decode_attention_work(L, D), dtype=torch.float32)
        _scratch.key = key
    return _scratch.work


def is_available() -> tuple[bool, str]:
    """(usable, reason naming the ISA): compiles the kernel on the first call."""
    return usable("decode_attention")


def splits_for(pairs: int, threads: int, chunks: int) -> int:
    """Key splits per (sequence, head) so ``pairs`` of them keep ``threads`` busy.

    1 when the pairs share out evenly or are many (>= 4 per thread); else the
    fewest splits that make the work items a multiple of the threads or >= 4 per
    thread, at most ``chunks`` (a split holds whole chunks of ``CHUNK`` keys).
    """
    if pairs < 1 or chunks <= 1 or pairs % threads == 0 or pairs >= 4 * threads:
        return 1
    s = 1
    while (pairs * s) % threads and pairs * s < 4 * threads:
        s += 1
    return min(s, chunks)


def _plain_float32(*tensors) -> bool:
    """Whether the C kernel can take these tensors: float32 on the CPU, none tracked by
    autograd, not inside ``torch.compile`` (a ctypes call cannot be traced). Plain
    comparisons: it runs once per layer per step."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not torch.compiler.is_compiling()


def _kernel_takes(q, k_cache, k_new, v_new) -> bool:
    """Whether the decode kernel runs these arguments: at least ``MIN_ROWS`` queries, and
    queries, caches and new block alike ``_plain_float32``."""
    new = () if k_new is None else (k_new, v_new)
    return q.shape[2] >= MIN_ROWS and _plain_float32(q, k_cache, *new)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with its last dimension contiguous (the kernel's only layout requirement)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def block_decode_attention(q, k_cache, v_cache, seq_lens, *, k_new=None, v_new=None, scale=None):
    """One decode step: q float32 [B, H, L, D] against caches float32 [B, H, M, D].

    seq_lens int32 [B]; with k_new/v_new ([B, H, L, D]) they are written into the
    caches at ``seq_lens[b]`` first, in place. q, k_new and v_new may be strided
    views (``split_heads`` of a [B, L, H*D] tensor); the caches' last dimension
    must be contiguous (the public wrapper checks it). scale: default 1/sqrt(D).
    Returns float32 [B, H, L, D], a ``transpose(1, 2)`` view of a contiguous
    [B, L, H, D] tensor (so merging the heads back is free). Fewer than ``MIN_ROWS``
    queries, other dtypes, autograd and ``torch.compile`` take the ``torch`` backend. Arguments are not validated
    here (``nbp_kernels.block_decode_attention`` does).
    """
    if not _kernel_takes(q, k_cache, k_new, v_new):
        return torch_ops.block_decode_attention(q, k_cache, v_cache, seq_lens, k_new=k_new,
                                                v_new=v_new, scale=scale)
    lib, isa, why = load("decode_attention", _bind)
    if lib is None:
        raise RuntimeError(f"decode_attention is not usable here: {why}")
    B, H, L, D = q.shape
    M = k_cache.shape[2]
    out = torch.empty(B, L, H, D, dtype=torch.float32)
    if out.numel() == 0:
        return out.transpose(1, 2)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    threads = max(1, torch.get_num_threads())
    splits = splits_for(B * H, threads, -(-M // CHUNK))
    work = _work(lib, threads, L, D)
    parts = torch.empty(B * H * splits * L * (D + 2), dtype=torch.float32) if splits > 1 else None
    tensors = (_rows(q), None if k_new is None else _rows(k_new),
               None if v_new is None else _rows(v_new), k_cache, v_cache)
    strides = (ctypes.c_int64 * 15)(*(s for t in tensors
                                      for s in (t.stride()[:3] if t is not None else (0, 0, 0))))
    lib.nbp_decode_attention(*(t.data_ptr() if t is not None else None for t in tensors),
                             strides, seq_lens.contiguous().data_ptr(), B, H, L, D, M, scale,
                             splits, threads, work.data_ptr(),
                             parts.data_ptr() if parts is not None else None, out.data_ptr())
    return out.transpose(1, 2)


def _blocks_take(q, k, v, block_size: int, cond_len: int, hybrid: bool) -> bool:
    """Whether ``block_causal_attention`` runs the kernel: whole blocks of at least
    ``MIN_ROWS`` queries from position 0 (no condition prefix, not hybrid), as many
    queries as keys, ``_plain_float32`` tensors."""
    S = q.shape[2]
    if cond_len or hybrid or block_size < MIN_ROWS or S % block_size or k.shape[2] != S:
        return False
    return _plain_float32(q, k, v)


def block_causal_attention(q, k, v, *, block_size, cond_len=0, hybrid=False, scale=None):
    """The NBP mask's attention of a whole sequence: q, k, v float32 [B, H, S, D] ->
    [B, H, S, D] (a ``transpose(1, 2)`` view of a contiguous [B, S, H, D] tensor).

    With blocks of L = ``block_size`` from position 0, the queries of block i see
    exactly the keys before (i + 1) L: a decode step's rule for a block appended at
    i L. So each sequence is one kernel call over S / L such blocks that share its keys
    (the batch stride of k and v set to 0), without the masked half of the scores that
    SDPA computes in its chunks (a 512-token layer in blocks of 16, 6 heads x 64:
    ``benchmarks/bench_block_causal_attention.py``, CPU prefill rows). Other layouts (a condition
    prefix, hybrid blocks, a last partial block), autograd and other dtypes take
    ``torch_ops.block_causal_attention``.
    """
    if not _blocks_take(q, k, v, block_size, cond_len, hybrid):
        return torch_ops.block_causal_attention(q, k, v, block_size=block_size,
                                                cond_len=cond_len, hybrid=hybrid, scale=scale)
    lib, isa, why = load("decode_attention", _bind)
    if lib is None:
        raise RuntimeError(f"decode_attention is not usable here: {why}")
    B, H, S, D = q.shape
    L, n = block_size, S // block_size
    out = torch.empty(B, S, H, D, dtype=torch.float32)
    if out.numel() == 0:
        return out.transpose(1, 2)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    threads = max(1, torch.get_num_threads())
    work = _work(lib, threads, L, D)
    starts = torch.arange(0, S, L, dtype=torch.int32)   # block i appended at i L
    q, k, v = _rows(q), _rows(k), _rows(v)
    for b in range(B):
        blocks = q[b].unflatten(1, (n, L)).transpose(0, 1)   # [n, H, L, D], strided
        strides = (ctypes.c_int64 * 15)(*blocks.stride()[:3], *(0,) * 6,
                                        0, *k.stride()[1:3], 0, *v.stride()[1:3])
        lib.nbp_decode_attention(blocks.data_ptr(), None, None, k[b].data_ptr(),
                                 v[b].data_ptr(), strides, starts.data_ptr(), n, H, L, D, S,
                                 scale, 1, threads, work.data_ptr(), None, out[b].data_ptr())
    return out.transpose(1, 2)
