"""``block_decode_attention`` on the CPU: ``cpu/decode_attention.c`` (float32, append fused).

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

__all__ = ["block_decode_attention", "is_available", "splits_for"]

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


def _kernel_takes(q, k_cache, k_new, v_new) -> bool:
    """Whether the C kernel runs these arguments: at least ``MIN_ROWS`` queries, float32
    CPU tensors (queries, caches and new block alike), no autograd, not inside
    ``torch.compile`` (a ctypes call cannot be traced). Plain comparisons: this runs
    once per layer per step."""
    f32 = torch.float32
    if q.shape[2] < MIN_ROWS or q.dtype != f32 or k_cache.dtype != f32 or q.device.type != "cpu":
        return False
    if k_new is not None and (k_new.dtype != f32 or v_new.dtype != f32):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k_cache.requires_grad or (
            k_new is not None and (k_new.requires_grad or v_new.requires_grad))):
        return False
    return not torch.compiler.is_compiling()


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
