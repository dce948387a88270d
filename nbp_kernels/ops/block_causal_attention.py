"""Fused block-causal (NBP) attention in Triton: flash-attention forward and backward.

The NBP mask is a *prefix* mask: query position ``i`` sees exactly the keys
``j < kv_end(i)`` where ``kv_end`` is the end of ``i``'s block (``cond_len`` for
condition rows, ``i + 1`` in the hybrid causal start), and ``kv_end`` never
decreases with ``i``. So a query tile loops over KV tiles ``[0, kv_end(last row))``
only; the tiles below ``kv_end(first row)`` are fully visible and run without a
mask, and only the few tiles in between (those cutting a block boundary) are
masked. The backward pass mirrors this from the key side: key ``j`` is seen by
the rows ``i >= q_start(j)`` (the start of ``j``'s block, 0 for condition keys).

Scores are kept in base 2 (``qk * scale * log2(e)``, ``exp2``); the forward
stores the per-row log-sum-exp in those units for the backward pass, which
recomputes the probabilities (dq in one kernel, dk/dv in another, after the
usual ``delta = rowsum(dO * O)`` preprocess). Head dims that are not a power of
two are split into two power-of-two chunks (see ``_common.head_split``).
"""
import math
from typing import Tuple

import torch

from .._tiles import next_pow2, strides3
from ._common import LOG2E, dot_precision, head_split, interpreting, last_dim_contiguous, tl, triton


@triton.jit
def _kv_end(i, S, cond_len, block_size, HYBRID: tl.constexpr):
    """Exclusive end of the keys visible to query position ``i`` (clipped to S)."""
    v = i - cond_len
    end = cond_len + (v // block_size + 1) * block_size
    if HYBRID:
        end = tl.where(v < block_size, i + 1, end)
    end = tl.where(v < 0, cond_len, end)
    return tl.minimum(end, S)


@triton.jit
def _q_start(j, cond_len, block_size, HYBRID: tl.constexpr):
    """First query position that sees key ``j``; every later row sees it too."""
    v = j - cond_len
    start = cond_len + (v // block_size) * block_size
    if HYBRID:
        start = tl.where(v < block_size, j, start)
    return tl.where(v < 0, 0, start)


@triton.jit
def _load_rows(base, offs_r, stride_r, r_ok, offs_d, D: tl.constexpr):
    """[R, Dc] tile: rows ``offs_r`` (stride ``stride_r``), head columns ``offs_d``."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    return tl.load(ptrs, mask=r_ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _load_t(base, offs_r, stride_r, r_ok, offs_d, D: tl.constexpr):
    """[Dc, R] tile: the transpose of ``_load_rows``, loaded directly."""
    ptrs = base + offs_r[None, :] * stride_r + offs_d[:, None]
    return tl.load(ptrs, mask=r_ok[None, :] & (offs_d[:, None] < D), other=0.0)


@triton.jit
def _store_rows(base, offs_r, stride_r, r_ok, offs_d, D: tl.constexpr, x):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=r_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _fwd_step(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, sks, svs, n0, S, hi_row, offs_n,
              offs_a, offs_b, qk_scale, D: tl.constexpr, HAS_B: tl.constexpr, MASKED: tl.constexpr,
              PREC: tl.constexpr):
    """One KV tile of the online softmax; returns the updated (acc_a, acc_b, m_i, l_i)."""
    offs = n0 + offs_n
    n_ok = offs < S
    qk = tl.dot(q_a, _load_t(k_base, offs, sks, n_ok, offs_a, D), input_precision=PREC)
    if HAS_B:
        qk += tl.dot(q_b, _load_t(k_base, offs, sks, n_ok, offs_b, D), input_precision=PREC)
    qk = qk * qk_scale
    if MASKED:
        qk = tl.where(offs[None, :] < hi_row[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_a = _load_rows(v_base, offs, svs, n_ok, offs_a, D)
    acc_a = acc_a * alpha[:, None] + tl.dot(p.to(v_a.dtype), v_a, input_precision=PREC)
    if HAS_B:
        v_b = _load_rows(v_base, offs, svs, n_ok, offs_b, D)
        acc_b = acc_b * alpha[:, None] + tl.dot(p.to(v_b.dtype), v_b, input_precision=PREC)
    return acc_a, acc_b, m_new, l_i


@triton.jit(do_not_specialize=["S", "cond_len", "block_size"])
def _fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                H, S, cond_len, block_size, qk_scale,
                D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
                HYBRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr):
    # Last query tiles see the most keys: launch them first (grid axis 1 is the
    # slowest-varying launch order) so the short tiles fill the tail.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    m_ok = offs_m < S
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    q_a = _load_rows(q_base, offs_m, sqs, m_ok, offs_a, D)
    q_b = q_a
    if HAS_B:
        q_b = _load_rows(q_base, offs_m, sqs, m_ok, offs_b, D)
    hi_row = _kv_end(offs_m, S, cond_len, block_size, HYBRID)
    hi_first = _kv_end(m0, S, cond_len, block_size, HYBRID)
    hi_last = _kv_end(tl.minimum(m0 + BLOCK_M, S) - 1, S, cond_len, block_size, HYBRID)
    n_full = (hi_first // BLOCK_N) * BLOCK_N
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        acc_a, acc_b, m_i, l_i = _fwd_step(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, sks, svs,
                                           n0, S, hi_row, offs_n, offs_a, offs_b, qk_scale,
                                           D, HAS_B, False, PREC)
    for n0 in range(n_full, hi_last, BLOCK_N):
        acc_a, acc_b, m_i, l_i = _fwd_step(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, sks, svs,
                                           n0, S, hi_row, offs_n, offs_a, offs_b, qk_scale,
                                           D, HAS_B, True, PREC)
    # Every valid row sees at least itself, so l_i > 0; padding rows are not stored.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o_base = O + b * sob + h * soh
    _store_rows(o_base, offs_m, sos, m_ok, offs_a, D, acc_a / l_safe[:, None])
    if HAS_B:
        _store_rows(o_base, offs_m, sos, m_ok, offs_b, D, acc_b / l_safe[:, None])
    tl.store(LSE + bh * S + offs_m, m_i + tl.math.log2(l_safe), mask=m_ok)


@triton.jit(do_not_specialize=["S"])
def _bwd_pre_kernel(O, DO, DELTA, sob, soh, sos, sdb, sdh, sds, H, S,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d O * dO (fp32)."""
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    o = _load_rows(O + b * sob + h * soh, offs_m, sos, m_ok, offs_d, D).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, sds, m_ok, offs_d, D).to(tl.float32)
    tl.store(DELTA + bh * S + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _dkdv_step(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base, sqs, sds, lse_base,
               delta_base, m0, S, lo_col, offs_mb, offs_a, offs_b, qk_scale,
               D: tl.constexpr, HAS_B: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr):
    """Accumulate one query tile's contribution to a key tile's dk, dv (transposed scores)."""
    offs_m = m0 + offs_mb
    m_ok = offs_m < S
    q_a = _load_rows(q_base, offs_m, sqs, m_ok, offs_a, D)
    do_a = _load_rows(do_base, offs_m, sds, m_ok, offs_a, D)
    qkT = tl.dot(k_a, tl.trans(q_a), input_precision=PREC)
    dpT = tl.dot(v_a, tl.trans(do_a), input_precision=PREC)
    q_b = q_a
    do_b = do_a
    if HAS_B:
        q_b = _load_rows(q_base, offs_m, sqs, m_ok, offs_b, D)
        do_b = _load_rows(do_base, offs_m, sds, m_ok, offs_b, D)
        qkT += tl.dot(k_b, tl.trans(q_b), input_precision=PREC)
        dpT += tl.dot(v_b, tl.trans(do_b), input_precision=PREC)
    lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
    if MASKED:
        pT = tl.where(offs_m[None, :] >= lo_col[:, None], pT, 0.0)
    dsT = pT * (dpT - delta[None, :])
    dv_a += tl.dot(pT.to(do_a.dtype), do_a, input_precision=PREC)
    dk_a += tl.dot(dsT.to(q_a.dtype), q_a, input_precision=PREC)
    if HAS_B:
        dv_b += tl.dot(pT.to(do_b.dtype), do_b, input_precision=PREC)
        dk_b += tl.dot(dsT.to(q_b.dtype), q_b, input_precision=PREC)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit(do_not_specialize=["S", "cond_len", "block_size"])
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                     sgkb, sgkh, sgks, sgvb, sgvh, sgvs,
                     H, S, cond_len, block_size, qk_scale, sm_scale,
                     D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
                     HYBRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PREC: tl.constexpr):
    # Key tiles in ascending order: the first ones are seen by the most queries.
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    n_ok = offs_n < S
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    k_a = _load_rows(k_base, offs_n, sks, n_ok, offs_a, D)
    v_a = _load_rows(v_base, offs_n, svs, n_ok, offs_a, D)
    k_b = k_a
    v_b = v_a
    if HAS_B:
        k_b = _load_rows(k_base, offs_n, sks, n_ok, offs_b, D)
        v_b = _load_rows(v_base, offs_n, svs, n_ok, offs_b, D)
    dk_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, DA], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, DB], dtype=tl.float32)
    lo_col = _q_start(offs_n, cond_len, block_size, HYBRID)
    lo_first = _q_start(n0, cond_len, block_size, HYBRID)
    lo_last = _q_start(tl.minimum(n0 + BLOCK_N, S) - 1, cond_len, block_size, HYBRID)
    m_begin = (lo_first // BLOCK_M) * BLOCK_M
    m_full = ((lo_last + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    lse_base = LSE + bh * S
    delta_base = DELTA + bh * S
    for m0 in range(m_begin, m_full, BLOCK_M):
        dk_a, dk_b, dv_a, dv_b = _dkdv_step(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base,
                                            sqs, sds, lse_base, delta_base, m0, S, lo_col, offs_mb,
                                            offs_a, offs_b, qk_scale, D, HAS_B, True, PREC)
    for m0 in range(m_full, S, BLOCK_M):
        dk_a, dk_b, dv_a, dv_b = _dkdv_step(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base,
                                            sqs, sds, lse_base, delta_base, m0, S, lo_col, offs_mb,
                                            offs_a, offs_b, qk_scale, D, HAS_B, False, PREC)
    dk_base = DK + b * sgkb + h * sgkh
    dv_base = DV + b * sgvb + h * sgvh
    _store_rows(dk_base, offs_n, sgks, n_ok, offs_a, D, dk_a * sm_scale)
    _store_rows(dv_base, offs_n, sgvs, n_ok, offs_a, D, dv_a)
    if HAS_B:
        _store_rows(dk_base, offs_n, sgks, n_ok, offs_b, D, dk_b * sm_scale)
        _store_rows(dv_base, offs_n, sgvs, n_ok, offs_b, D, dv_b)


@triton.jit
def _dq_step(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, sks, svs, n0, S, hi_row,
             offs_n, offs_a, offs_b, qk_scale, D: tl.constexpr, HAS_B: tl.constexpr,
             MASKED: tl.constexpr, PREC: tl.constexpr):
    """Accumulate one key tile's contribution to a query tile's dq."""
    offs = n0 + offs_n
    n_ok = offs < S
    kt_a = _load_t(k_base, offs, sks, n_ok, offs_a, D)
    qk = tl.dot(q_a, kt_a, input_precision=PREC)
    dp = tl.dot(do_a, _load_t(v_base, offs, svs, n_ok, offs_a, D), input_precision=PREC)
    kt_b = kt_a
    if HAS_B:
        kt_b = _load_t(k_base, offs, sks, n_ok, offs_b, D)
        qk += tl.dot(q_b, kt_b, input_precision=PREC)
        dp += tl.dot(do_b, _load_t(v_base, offs, svs, n_ok, offs_b, D), input_precision=PREC)
    p = tl.math.exp2(qk * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(offs[None, :] < hi_row[:, None], p, 0.0)
    ds = p * (dp - delta[:, None])
    dq_a += tl.dot(ds.to(kt_a.dtype), tl.trans(kt_a), input_precision=PREC)
    if HAS_B:
        dq_b += tl.dot(ds.to(kt_b.dtype), tl.trans(kt_b), input_precision=PREC)
    return dq_a, dq_b


@triton.jit(do_not_specialize=["S", "cond_len", "block_size"])
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds, sgb, sgh, sgs,
                   H, S, cond_len, block_size, qk_scale, sm_scale,
                   D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
                   HYBRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   PREC: tl.constexpr):
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    m_ok = offs_m < S
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    q_a = _load_rows(q_base, offs_m, sqs, m_ok, offs_a, D)
    do_a = _load_rows(do_base, offs_m, sds, m_ok, offs_a, D)
    q_b = q_a
    do_b = do_a
    if HAS_B:
        q_b = _load_rows(q_base, offs_m, sqs, m_ok, offs_b, D)
        do_b = _load_rows(do_base, offs_m, sds, m_ok, offs_b, D)
    lse = tl.load(LSE + bh * S + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * S + offs_m, mask=m_ok, other=0.0)
    hi_row = _kv_end(offs_m, S, cond_len, block_size, HYBRID)
    hi_first = _kv_end(m0, S, cond_len, block_size, HYBRID)
    hi_last = _kv_end(tl.minimum(m0 + BLOCK_M, S) - 1, S, cond_len, block_size, HYBRID)
    n_full = (hi_first // BLOCK_N) * BLOCK_N
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    dq_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        dq_a, dq_b = _dq_step(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, sks, svs,
                              n0, S, hi_row, offs_n, offs_a, offs_b, qk_scale, D, HAS_B, False, PREC)
    for n0 in range(n_full, hi_last, BLOCK_N):
        dq_a, dq_b = _dq_step(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, sks, svs,
                              n0, S, hi_row, offs_n, offs_a, offs_b, qk_scale, D, HAS_B, True, PREC)
    dq_base = DQ + b * sgb + h * sgh
    _store_rows(dq_base, offs_m, sgs, m_ok, offs_a, D, dq_a * sm_scale)
    if HAS_B:
        _store_rows(dq_base, offs_m, sgs, m_ok, offs_b, D, dq_b * sm_scale)


# --------------------------------------------------------------------------- launch

# kind -> (BLOCK_M, BLOCK_N, num_warps, num_stages), set only by tuning sweeps
# (benchmarks/gpu_table.py) to time other tilings; empty in normal use.
TILE_OVERRIDES: dict = {}


def _tiles(kind: str, dtype: torch.dtype, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for ``kind`` in fwd | dkdv | dq.

    Fixed per device class (no autotuning, so a first call inside CUDA-graph
    capture launches nothing extra). The interpreter gets 16x16 tiles: it runs
    every program in Python, so small tiles keep tiny test shapes cheap.
    """
    if kind in TILE_OVERRIDES:
        return TILE_OVERRIDES[kind]
    if interpreting():
        return 16, 16, 1, 1
    wide = d > 64
    if dtype == torch.float32:  # full-precision dots need twice the registers per element
        return {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}[kind]
    return {"fwd": (128, 64, 8 if wide else 4, 3),
            "dkdv": (32, 128, 8 if wide else 4, 3),
            "dq": (128, 32, 8 if wide else 4, 3)}[kind]


def _shape_args(q: torch.Tensor) -> dict:
    d = q.shape[-1]
    da, db = head_split(d)
    return dict(D=d, DA=da, DB=max(db, 16), HAS_B=db > 0, PREC=dot_precision(q.dtype))


def forward(q, k, v, block_size: int, cond_len: int, hybrid: bool, scale: float):
    """Launch the forward kernel. q, k, v: [B, H, S, D] -> (out [B, H, S, D] q.dtype, lse [B, H, S] fp32).

    ``lse`` is the per-row log-sum-exp in base-2 units of ``qk * scale * log2(e)``.
    """
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    B, H, S, _ = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    bm, bn, warps, stages = _tiles("fwd", q.dtype, q.shape[-1])
    grid = (B * H, triton.cdiv(S, bm))
    _fwd_kernel[grid](q, k, v, o, lse, *strides3(q), *strides3(k), *strides3(v), *strides3(o),
                      H, S, cond_len, block_size, scale * LOG2E, HYBRID=hybrid,
                      BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **_shape_args(q))
    return o, lse


def backward(do, q, k, v, o, lse, block_size: int, cond_len: int, hybrid: bool, scale: float):
    """Gradients (dq, dk, dv), each [B, H, S, D] in q.dtype, from dO [B, H, S, D]."""
    do, q, k, v = (last_dim_contiguous(t) for t in (do, q, k, v))
    B, H, S, D = q.shape
    delta = torch.empty((B, H, S), dtype=torch.float32, device=q.device)
    pre_m = 16 if interpreting() else 64
    _bwd_pre_kernel[(triton.cdiv(S, pre_m), B * H)](o, do, delta, *strides3(o), *strides3(do), H, S,
                                                    D=D, BLOCK_M=pre_m, BLOCK_D=next_pow2(D))
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    common = dict(HYBRID=hybrid, **_shape_args(q))
    bm, bn, warps, stages = _tiles("dkdv", q.dtype, D)
    _bwd_dkdv_kernel[(B * H, triton.cdiv(S, bn))](
        q, k, v, do, lse, delta, dk, dv, *strides3(q), *strides3(k), *strides3(v), *strides3(do),
        *strides3(dk), *strides3(dv), H, S, cond_len, block_size, scale * LOG2E, scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)
    bm, bn, warps, stages = _tiles("dq", q.dtype, D)
    _bwd_dq_kernel[(B * H, triton.cdiv(S, bm))](
        q, k, v, do, lse, delta, dq, *strides3(q), *strides3(k), *strides3(v), *strides3(do),
        *strides3(dq), H, S, cond_len, block_size, scale * LOG2E, scale,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common)
    return dq, dk, dv


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("nbp::block_causal_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int, cond_len: int,
            hybrid: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return forward(q, k, v, block_size, cond_len, hybrid, scale)


@_fwd_op.register_fake
def _(q, k, v, block_size, cond_len, hybrid, scale):
    B, H, S, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("nbp::block_causal_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, block_size: int, cond_len: int, hybrid: bool,
            scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backward(do, q, k, v, o, lse, block_size, cond_len, hybrid, scale)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, block_size, cond_len, hybrid, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block_size, cond_len, hybrid, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.args = (block_size, cond_len, hybrid, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def block_causal_attention(q, k, v, *, block_size, cond_len=0, hybrid=False, scale=None):
    """Attention under the NBP mask. q, k, v: [B, H, S, D] fp32/fp16/bf16 -> [B, H, S, D] q.dtype.

    Differentiable (Triton backward kernels). Arguments are validated by the
    public wrapper ``nbp_kernels.block_causal_attention`` (head_dim <= 256 by
    the registry's ``supports``).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _fwd_op(q, k, v, int(block_size), int(cond_len), bool(hybrid), scale)
    return out
