"""Block decode attention in Triton: split-KV (flash-decoding) with a fused in-place append.

One decode step: the L queries of sequence ``b`` attend to every position
``< seq_lens[b] + L`` of its cache. The visible range is split into
``num_splits`` chunks, each handled by its own program (grid: split x
batch*head x query tile), so batch 1 still fills the GPU; a second kernel
combines the per-split partial outputs with their log-sum-exps. Chunk bounds
are computed in the kernel from ``seq_lens`` (device tensor, no host sync):
every split gets an equal share of the *actual* length, not of ``max_seq``.

Fused append: the positions ``[seq_lens[b], seq_lens[b] + L)`` are read from
``k_new``/``v_new`` directly, never from the cache, by the one split whose
chunk covers them, and that split (query tile 0 only) also stores them into
the cache. So no program depends on another program's write, and the cache is
written only inside the block and below ``max_seq``.
"""
import math
from typing import Optional

import torch

from .._tiles import next_pow2, sm_count, strides3
from ._common import LOG2E, dot_precision, head_split, interpreting, last_dim_contiguous, tl, triton
from .block_causal_attention import _load_rows, _load_t, _store_rows


@triton.jit
def _decode_step(acc_a, acc_b, m_i, l_i, q_a, q_b, k_base, v_base, sks, svs, offs, n_ok,
                 offs_a, offs_b, qk_scale, D: tl.constexpr, HAS_B: tl.constexpr, PREC: tl.constexpr,
                 STORE: tl.constexpr, store_ok, kc_base, vc_base, skcs, svcs, pos):
    """One KV tile (rows ``offs`` of k_base/v_base, ``n_ok`` valid) of the online softmax.

    With STORE (and the runtime flag ``store_ok``) the tile, a piece of the new
    block, is also written to the caches at rows ``pos``. Values are rounded to
    the cache dtype first, so the attention sees exactly what the cache holds.
    """
    kt_a = _load_t(k_base, offs, sks, n_ok, offs_a, D).to(kc_base.dtype.element_ty)
    v_a = _load_rows(v_base, offs, svs, n_ok, offs_a, D).to(vc_base.dtype.element_ty)
    if STORE:
        w_ok = tl.where(store_ok, n_ok, False)  # (a bool tensor & a bool scalar trips the interpreter)
        tl.store(kc_base + pos[None, :] * skcs + offs_a[:, None], kt_a,
                 mask=w_ok[None, :] & (offs_a[:, None] < D))
        _store_rows(vc_base, pos, svcs, w_ok, offs_a, D, v_a)
    qk = tl.dot(q_a, kt_a.to(q_a.dtype), input_precision=PREC)
    if HAS_B:
        kt_b = _load_t(k_base, offs, sks, n_ok, offs_b, D).to(kc_base.dtype.element_ty)
        if STORE:
            tl.store(kc_base + pos[None, :] * skcs + offs_b[:, None], kt_b,
                     mask=w_ok[None, :] & (offs_b[:, None] < D))
        qk += tl.dot(q_b, kt_b.to(q_b.dtype), input_precision=PREC)
    qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A chunk's first tile always has a valid column, so m_new is finite here.
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc_a = acc_a * alpha[:, None] + tl.dot(p.to(q_a.dtype), v_a.to(q_a.dtype), input_precision=PREC)
    if HAS_B:
        v_b = _load_rows(v_base, offs, svs, n_ok, offs_b, D).to(vc_base.dtype.element_ty)
        if STORE:
            _store_rows(vc_base, pos, svcs, w_ok, offs_b, D, v_b)
        acc_b = acc_b * alpha[:, None] + tl.dot(p.to(q_b.dtype), v_b.to(q_b.dtype), input_precision=PREC)
    return acc_a, acc_b, m_new, l_i


@triton.jit(do_not_specialize=["L", "M", "SPLITS"])
def _decode_kernel(Q, KC, VC, KN, VN, SEQ, OPART, LPART, OUT,
                   sqb, sqh, sqs, skcb, skch, skcs, svcb, svch, svcs,
                   sknb, sknh, skns, svnb, svnh, svns, sob, soh, sos,
                   H, L, M, qk_scale, SPLITS,
                   D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HAS_B: tl.constexpr,
                   HAS_NEW: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start = tl.load(SEQ + b)
    n_total = tl.minimum(start + L, M)
    chunk = tl.cdiv(tl.cdiv(n_total, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_total)
    # Without a new block every visible position is read from the cache.
    cache_end = hi
    if HAS_NEW:
        cache_end = tl.minimum(hi, start)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_a = tl.arange(0, DA)
    offs_b = DA + tl.arange(0, DB)
    m_ok = offs_m < L
    q_base = Q + b * sqb + h * sqh
    q_a = _load_rows(q_base, offs_m, sqs, m_ok, offs_a, D)
    q_b = q_a
    if HAS_B:
        q_b = _load_rows(q_base, offs_m, sqs, m_ok, offs_b, D)
    kc_base = KC + b * skcb + h * skch
    vc_base = VC + b * svcb + h * svch
    acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(lo, cache_end, BLOCK_N):
        offs = n0 + offs_n
        acc_a, acc_b, m_i, l_i = _decode_step(acc_a, acc_b, m_i, l_i, q_a, q_b, kc_base, vc_base,
                                              skcs, svcs, offs, offs < cache_end, offs_a, offs_b,
                                              qk_scale, D, HAS_B, PREC, False, False, kc_base, vc_base,
                                              skcs, svcs, offs)
    if HAS_NEW:
        kn_base = KN + b * sknb + h * sknh
        vn_base = VN + b * svnb + h * svnh
        for n0 in range(tl.maximum(lo, start), hi, BLOCK_N):
            offs = n0 + offs_n
            acc_a, acc_b, m_i, l_i = _decode_step(acc_a, acc_b, m_i, l_i, q_a, q_b, kn_base, vn_base,
                                                  skns, svns, offs - start, offs < hi, offs_a, offs_b,
                                                  qk_scale, D, HAS_B, PREC, True, pid_m == 0, kc_base,
                                                  vc_base, skcs, svcs, offs)
    _decode_finish(acc_a, acc_b, m_i, l_i, bh, split, offs_m, m_ok, offs_a, offs_b, b, h, L,
                   OPART, LPART, OUT, sob, soh, sos, SPLITS, D, DA, DB, HAS_B, DIRECT)


@triton.jit
def _decode_finish(acc_a, acc_b, m_i, l_i, bh, split, offs_m, m_ok, offs_a, offs_b, b, h, L,
                   OPART, LPART, OUT, sob, soh, sos, SPLITS, D: tl.constexpr, DA: tl.constexpr,
                   DB: tl.constexpr, HAS_B: tl.constexpr, DIRECT: tl.constexpr):
    """Store the final output (DIRECT: one split) or the split's normalised partial and its lse."""
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    if DIRECT:
        o_base = OUT + b * sob + h * soh
        _store_rows(o_base, offs_m, sos, m_ok, offs_a, D, acc_a / l_safe[:, None])
        if HAS_B:
            _store_rows(o_base, offs_m, sos, m_ok, offs_b, D, acc_b / l_safe[:, None])
    else:
        # partials: [B*H, SPLITS, L, D] fp32; an empty split stores lse = -inf.
        p_base = OPART + (bh * SPLITS + split).to(tl.int64) * L * D
        _store_rows(p_base, offs_m, D, m_ok, offs_a, D, acc_a / l_safe[:, None])
        if HAS_B:
            _store_rows(p_base, offs_m, D, m_ok, offs_b, D, acc_b / l_safe[:, None])
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_safe), float("-inf"))
        tl.store(LPART + (bh * SPLITS + split) * L + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=["L", "SPLITS"])
def _decode_reduce_kernel(OPART, LPART, OUT, sob, soh, sos, H, L, SPLITS, D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[b, h, m] = sum_s w_s * OPART[bh, s, m] with w_s = softmax over splits of their lse."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L
    lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(SPLITS):
        lse = tl.load(LPART + (bh * SPLITS + s) * L + offs_m, mask=m_ok, other=0.0)
        lse_max = tl.maximum(lse_max, lse)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(SPLITS):
        lse = tl.load(LPART + (bh * SPLITS + s) * L + offs_m, mask=m_ok, other=0.0)
        w = tl.math.exp2(lse - lse_max)
        part = _load_rows(OPART + (bh * SPLITS + s).to(tl.int64) * L * D, offs_m, D, m_ok, offs_d, D)
        acc += w[:, None] * part
        den += w
    _store_rows(OUT + b * sob + h * soh, offs_m, sos, m_ok, offs_d, D, acc / den[:, None])


def _tiles(L: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the split kernel for a block of L queries."""
    if interpreting():
        return 16, 16, 1, 1
    bm = 16 if L <= 16 else (32 if L <= 32 else 64)
    return bm, 64, 4, 3


def choose_splits(batch: int, heads: int, L: int, max_seq: int, device: torch.device) -> int:
    """Splits of the KV length: about two programs per SM, at least two KV tiles per split.

    ``max_seq`` bounds the visible length (the actual lengths live on the
    device and are not read here).
    """
    bm, bn, _, _ = _tiles(L)
    programs = batch * heads * triton.cdiv(L, bm)
    wanted = triton.cdiv(2 * sm_count(device), programs)
    return max(1, min(wanted, triton.cdiv(max_seq, 2 * bn), 64))


def decode(q, k_cache, v_cache, seq_lens, k_new, v_new, scale: float, num_splits: int = 0):
    """Launch the split kernel (+ reduction); shapes as ``block_decode_attention``.

    Returns [B, H, L, D] in q.dtype.

    ``num_splits`` 0 chooses from the shape (``choose_splits``).
    """
    q = last_dim_contiguous(q)
    B, H, L, D = q.shape
    M = k_cache.shape[2]
    has_new = k_new is not None
    if has_new:
        k_new, v_new = last_dim_contiguous(k_new), last_dim_contiguous(v_new)
    else:
        k_new, v_new = k_cache, v_cache  # never read: HAS_NEW is False
    splits = num_splits or choose_splits(B, H, L, M, q.device)
    bm, bn, warps, stages = _tiles(L)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if splits > 1:
        opart = torch.empty((B * H, splits, L, D), dtype=torch.float32, device=q.device)
        lpart = torch.empty((B * H, splits, L), dtype=torch.float32, device=q.device)
    else:
        opart = lpart = out  # never written: one split stores straight to out
    da, db = head_split(D)
    _decode_kernel[(splits, B * H, triton.cdiv(L, bm))](
        q, k_cache, v_cache, k_new, v_new, seq_lens, opart, lpart, out,
        *strides3(q), *strides3(k_cache), *strides3(v_cache), *strides3(k_new), *strides3(v_new),
        *strides3(out), H, L, M, scale * LOG2E, splits, D=D, DA=da, DB=max(db, 16), HAS_B=db > 0,
        HAS_NEW=has_new, DIRECT=splits == 1, BLOCK_M=bm, BLOCK_N=bn, PREC=dot_precision(q.dtype),
        num_warps=warps, num_stages=stages)
    if splits > 1:
        rm = 16
        bd = next_pow2(D)
        _decode_reduce_kernel[(B * H, triton.cdiv(L, rm))](opart, lpart, out, *strides3(out), H, L,
                                                           splits, D=D, BLOCK_M=rm, BLOCK_D=bd,
                                                           num_warps=4)
    return out


@torch.library.custom_op("nbp::block_decode_attention", mutates_args=())
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, num_splits: int) -> torch.Tensor:
    return decode(q, k_cache, v_cache, seq_lens, None, None, scale, num_splits)


@_decode_op.register_fake
def _(q, k_cache, v_cache, seq_lens, scale, num_splits):
    return q.new_empty(q.shape)


@torch.library.custom_op("nbp::block_decode_attention_append_", mutates_args=("k_cache", "v_cache"))
def _decode_append_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      seq_lens: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      scale: float, num_splits: int) -> torch.Tensor:
    return decode(q, k_cache, v_cache, seq_lens, k_new, v_new, scale, num_splits)


@_decode_append_op.register_fake
def _(q, k_cache, v_cache, seq_lens, k_new, v_new, scale, num_splits):
    return q.new_empty(q.shape)


def block_decode_attention(q, k_cache, v_cache, seq_lens, *, k_new=None, v_new=None, scale=None,
                           num_splits: Optional[int] = None):
    """One decode step. q: [B, H, L, D]; caches [B, H, M, D]; seq_lens int32 [B] -> [B, H, L, D] q.dtype.

    With k_new/v_new ([B, H, L, D]) they are written into the caches at
    ``seq_lens[b]`` in the same launch. ``num_splits`` (tests, tuning)
    overrides the split count chosen from the shape. Arguments are validated
    by the public wrapper ``nbp_kernels.block_decode_attention`` (head_dim <=
    256 by the registry's ``supports``).
    """
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 0):
        raise ValueError(f"num_splits: expected a non-negative int (0 = choose), got {num_splits!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    splits = int(num_splits or 0)
    if k_new is None:
        return _decode_op(q, k_cache, v_cache, seq_lens, scale, splits)
    return _decode_append_op(q, k_cache, v_cache, seq_lens, k_new, v_new, scale, splits)
