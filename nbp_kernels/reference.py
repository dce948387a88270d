"""The one semantic definition of every op in ``nbp_kernels``.

Plain PyTorch, computed in float32, written to be obviously right rather than
fast. Every backend (``torch``, ``triton``, ``cuda``) is tested against these
functions. Shapes follow docs/design.md: ``[batch, heads, seq, head_dim]``; caches
are preallocated ``[batch, heads, max_seq, head_dim]``; ``seq_lens`` is an
int32 tensor ``[batch]``.

The NBP mask (query position ``i``, key position ``j``, the first ``cond_len``
positions being the condition):

* ``j < cond_len``: visible to every row;
* ``i < cond_len <= j``: hidden;
* otherwise visible iff ``block_id(j) <= block_id(i)``.

``block_id`` numbers the video positions ``p >= cond_len``:

* non-hybrid: ``(p - cond_len) // block_size``;
* hybrid: the first ``block_size`` video positions are blocks of one token
  (a causal start), then blocks of ``block_size`` from ``cond_len + block_size``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "block_ids",
    "nbp_mask",
    "masked_attention",
    "block_causal_attention",
    "block_decode_attention",
    "kv_append_",
    "linear",
    "quantize_weight",
    "dequantized_linear",
    "quantize_rows",
    "act_levels",
    "int8_linear",
    "fused_linear",
    "decode_step",
    "keep_threshold",
    "draw_kept",
]


def block_ids(positions: torch.Tensor, *, block_size: int, cond_len: int = 0,
              hybrid: bool = False) -> torch.Tensor:
    """Block index of each position (int64, same shape as ``positions``).

    Condition positions (``p < cond_len``) get -1.
    """
    v = positions - cond_len
    if hybrid:
        ids = torch.where(v < block_size, v, block_size + (v - block_size) // block_size)
    else:
        ids = torch.div(v, block_size, rounding_mode="floor")
    return torch.where(v < 0, torch.full_like(ids, -1), ids)


def nbp_mask(q_len: int, kv_len: int | None = None, *, block_size: int, cond_len: int = 0,
             hybrid: bool = False, q_offset: int | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean NBP mask ``[q_len, kv_len]``; True where the query may attend.

    Query row ``r`` sits at absolute position ``q_offset + r`` (default
    ``kv_len - q_len``, i.e. the queries are the last ``q_len`` keys).
    """
    kv_len = q_len if kv_len is None else kv_len
    q_offset = kv_len - q_len if q_offset is None else q_offset
    i = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    bi = block_ids(i, block_size=block_size, cond_len=cond_len, hybrid=hybrid)
    bj = block_ids(j, block_size=block_size, cond_len=cond_len, hybrid=hybrid)
    in_cond_j = j < cond_len
    in_cond_i = i < cond_len
    return in_cond_j | (~in_cond_i & (bj <= bi))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """Softmax attention with an explicit boolean mask, in float32.

    q: [B, H, Sq, D]; k, v: [B, H, Sk, D]; mask: bool broadcastable to
    [B, H, Sq, Sk]. Returns [B, H, Sq, D] in q's dtype. Rows with no visible
    key return zeros (never NaN).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype)


def block_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           block_size: int, cond_len: int = 0, hybrid: bool = False,
                           scale: float | None = None) -> torch.Tensor:
    """Full-sequence attention under the NBP mask.

    q, k, v: [B, H, S, D], any float dtype. Returns [B, H, S, D] in q's dtype.
    Differentiable (autograd through the float32 computation).
    """
    mask = nbp_mask(q.shape[2], k.shape[2], block_size=block_size, cond_len=cond_len,
                    hybrid=hybrid, device=q.device)
    return masked_attention(q, k, v, mask, scale)


def kv_append_(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
               v_new: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Write a block in place: ``cache[b, :, seq_lens[b] : seq_lens[b] + L] = new[b]``.

    k_cache, v_cache: [B, H, M, D]; k_new, v_new: [B, H, L, D]; seq_lens: int [B].
    Positions outside the block are left untouched. The caller guarantees
    ``seq_lens[b] + L <= M`` (the public wrappers check it).
    """
    L = k_new.shape[2]
    for b, s in enumerate(seq_lens.tolist()):
        k_cache[b, :, s:s + L] = k_new[b].to(k_cache.dtype)
        v_cache[b, :, s:s + L] = v_new[b].to(v_cache.dtype)


def block_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           seq_lens: torch.Tensor, *, k_new: torch.Tensor | None = None,
                           v_new: torch.Tensor | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """One decode step: a block of L queries per sequence against its cache.

    q: [B, H, L, D]; k_cache, v_cache: [B, H, M, D]; seq_lens: int [B], the
    number of valid cached positions before this block. With k_new/v_new
    ([B, H, L, D]) they are first written in place at ``seq_lens[b]``.
    Query row ``r`` of sequence ``b`` attends to every cache position
    ``< seq_lens[b] + L`` (the whole block is visible to each of its rows).
    Returns [B, H, L, D] in q's dtype.
    """
    if k_new is not None:
        kv_append_(k_cache, v_cache, k_new, v_new, seq_lens)
    L = q.shape[2]
    outs = []
    for b, s in enumerate(seq_lens.tolist()):
        n = s + L
        mask = torch.ones(L, n, dtype=torch.bool, device=q.device)
        outs.append(masked_attention(q[b:b + 1], k_cache[b:b + 1, :, :n], v_cache[b:b + 1, :, :n],
                                     mask, scale))
    return torch.cat(outs, dim=0)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N]: what ``packed_linear`` computes."""
    y = torch.matmul(x, weight.t())
    return y if bias is None else y + bias


def gelu(y: torch.Tensor) -> torch.Tensor:
    """The exact GELU, y Phi(y) = y / 2 erfc(-y / sqrt 2) (``torch.nn.GELU()``,
    approximate='none'), any shape: what the CPU linears' ``act="gelu"`` applies to their
    outputs. Written with erfc, which keeps its relative accuracy for y < 0, where
    ``F.gelu``'s y / 2 (1 + erf(y / sqrt 2)) cancels (in float64 too, below y = -7)."""
    return y * 0.5 * torch.special.erfc(y * -math.sqrt(0.5))


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu(linear(x, weight, bias))`` [..., N]: what ``packed_linear(..., act="gelu")``
    computes (an MLP's first layer and its activation)."""
    return gelu(linear(x, weight, bias))


def quantize_weight(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float32 weight [N, K] stored at ``dtype``: (stored [N, K], scale float32 [N] or None).

    float32: unchanged; bfloat16: rounded to nearest even; int8: symmetric per
    output channel, scale = max |weight[n]| / 127 (1 for an all-zero row) and
    stored = round(weight / scale) in [-127, 127].
    """
    if dtype in (torch.float32, torch.bfloat16):
        return weight.to(dtype), None
    if dtype != torch.int8:
        raise ValueError(f"dtype: expected torch.float32, torch.bfloat16 or torch.int8, got {dtype}")
    absmax = weight.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).float()
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def dequantized_linear(x: torch.Tensor, stored: torch.Tensor, scale: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x, W, bias)`` with W = stored * scale[:, None] in float32 (``quantize_weight``'s
    output): what ``packed_linear`` computes for bfloat16 and int8 weights. x float32 [..., K]
    (float64 computes the exact value in float64)."""
    w = stored.to(x.dtype)
    return linear(x, w if scale is None else w * scale.to(x.dtype)[:, None], bias)


INT_ACT_DTYPES = (torch.int8, torch.int16)   # what ``int8_linear`` rounds activations to


def act_levels(act_dtype: torch.dtype, in_features: int) -> int:
    """The largest |value| of a quantized activation row: 127 for torch.int8; for
    torch.int16, min(32767, (2^31 - 1) // (127 in_features)), so that no int32 sum of
    in_features products with int8 weights can overflow (32767 up to 516 in_features,
    11008 at 1536: 13.4 bits)."""
    if act_dtype == torch.int8:
        return 127
    if act_dtype == torch.int16:
        return min(32767, (2**31 - 1) // (127 * max(int(in_features), 1)))
    raise ValueError(f"act_dtype: expected torch.int8 or torch.int16, got {act_dtype!r}")


def quantize_rows(x: torch.Tensor, act_dtype: torch.dtype = torch.int8
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x float32 [M, K] to ``act_dtype`` (int8 or int16), symmetric:
    (xq [M, K] of act_dtype, sx float32 [M]).

    With Q = ``act_levels(act_dtype, K)``, in float32: amax = max |x[m]|, inv = Q /
    amax, xq = x * inv rounded half to even (already in [-Q, Q]; clamped all the
    same), sx = amax / Q, so x ~ xq * sx[:, None]. An all-zero row gives inv = 0,
    xq = 0, sx = 0. x must be finite. What ``int8_linear`` does to its activations.
    """
    levels = act_levels(act_dtype, x.shape[-1])
    amax = x.float().abs().amax(dim=-1)
    # a true division (Q / tensor would be Q * reciprocal(tensor): two roundings)
    inv = torch.where(amax > 0, torch.full_like(amax, levels).div(amax), torch.zeros_like(amax))
    xq = torch.round(x.float() * inv[:, None]).clamp(-levels, levels).to(act_dtype)
    return xq, amax / levels


def int8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, act_dtype: torch.dtype = torch.int8
                ) -> torch.Tensor:
    """Dynamic integer activations times int8 weights: x float32 [M, K] -> float32 [M, N].

    wq int8 [N, K] and w_scale float32 [N] are ``quantize_weight(w, torch.int8)``;
    bias float32 [N] or None; act_dtype: torch.int8 or torch.int16, what the rows
    are rounded to. With (xq, sx) = ``quantize_rows(x, act_dtype)``: acc = xq @ wq^T
    summed exactly (an int32 sum, as ``act_levels`` bounds it; computed here in
    float64, where every partial sum of such integers is exact), then in float32,
    one rounding per step and in this order: s = sx[m] * w_scale[n], y =
    float32(acc) * s, y = y + bias[n]. What ``nbp_kernels.int8_linear`` computes,
    bit for bit.
    """
    xq, sx = quantize_rows(x, act_dtype)
    acc = (xq.double() @ wq.double().t()).float()
    y = acc * (sx[:, None] * w_scale.float()[None, :])
    return y if bias is None else y + bias


def bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """x (float32 or float64) with its float32 values rounded to bfloat16 (nearest even),
    in x's dtype: what the CPU linears do to their rows with ``act_dtype=torch.bfloat16``
    (the products of two bfloat16 are exact in float32; only the sums then round)."""
    return x.float().to(torch.bfloat16).to(x.dtype)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 scale: torch.Tensor | None = None, norm=None, act: str | None = None,
                 residual: torch.Tensor | None = None,
                 act_dtype: torch.dtype | None = None) -> torch.Tensor:
    """residual + act(linear(layer_norm(x), W, bias)): what the CPU linears compute with
    their LayerNorm prologue (``norm``), activation (``act``) and residual epilogue.

    x [..., K] (float32, or float64 for the exact value); weight [N, K], float32 or
    ``quantize_weight``'s stored weight with its ``scale`` (``dequantized_linear``);
    norm: None or (weight, bias, eps), ``F.layer_norm`` over the last dimension
    (weight, bias [K] or None); act: None or "gelu" (``gelu``); residual: None or
    [..., N]. act_dtype: None (or torch.float32) for the float product, or torch.int8
    / torch.int16: the product is ``int8_linear`` of the normalised rows (int8 weight
    and scale), which rounds them to act_dtype; or torch.bfloat16 (bfloat16 weight):
    the normalised rows are rounded to bfloat16 first (``bf16_rows``). Returns [..., N]
    in x's dtype.
    """
    if norm is not None:
        w, b, eps = norm
        x = F.layer_norm(x, x.shape[-1:], None if w is None else w.to(x.dtype),
                         None if b is None else b.to(x.dtype), eps)
    if act_dtype in (None, torch.float32, torch.bfloat16):
        rows = bf16_rows(x) if act_dtype == torch.bfloat16 else x
        y = dequantized_linear(rows, weight, scale, None if bias is None else bias.to(x.dtype))
    else:   # integer rows (int8_linear refuses any other dtype)
        y = int8_linear(x.reshape(-1, x.shape[-1]), weight, scale, bias, act_dtype)
        y = y.view(*x.shape[:-1], -1)
    if act == "gelu":
        y = gelu(y)
    elif act is not None:
        raise ValueError(f"act: expected None or 'gelu', got {act!r}")
    return y if residual is None else y + residual.to(y.dtype)


def decode_step(ids: torch.Tensor, seq_lens: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, *, tok_emb: torch.Tensor, pos_emb: torch.Tensor,
                blocks: list[dict], ln_f, head: tuple, n_head: int,
                act_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One decode step of the NBP transformer (GPT-2 blocks, pre-LayerNorm): what
    ``decode_step_cpu.DecodeProgram`` computes.

    ids: int64 [B, L], the tokens at positions ``seq_lens[b] + 0..L-1``; seq_lens: int32
    [B]; k_cache, v_cache: [n_layer, B, H, M, D], layer i's keys and values written in
    place at seq_lens (``block_decode_attention``); tok_emb [V, C], pos_emb [n_pos, C].
    blocks: one dict per layer, ``ln1``/``ln2`` (weight, bias, eps) and ``qkv`` (q, k and v
    stacked), ``proj``, ``fc1``, ``fc2`` as (weight [N, K], bias [N] or None, scale [N] or
    None), ``fused_linear``'s weight arguments (act_dtype torch.int8 or torch.int16: every
    linear is ``int8_linear`` of the int8 weights, its rows rounded to act_dtype;
    torch.bfloat16: bfloat16 weights times rows rounded to bfloat16). ln_f: (weight, bias, eps); head: (weight, bias, scale).
    x = tok_emb[ids] + pos_emb[positions]; per layer x += proj(attention(qkv(ln1(x)))),
    x += fc2(gelu(fc1(ln2(x)))); returns head(ln_f(x)), float32 [B, L, V].
    """
    B, L = ids.shape
    C = tok_emb.shape[1]
    positions = seq_lens.long()[:, None] + torch.arange(L, device=ids.device)
    x = tok_emb[ids] + pos_emb[positions]

    def lin(params, x, **kw):
        weight, bias, scale = params
        return fused_linear(x, weight, bias, scale=scale, act_dtype=act_dtype, **kw)

    def heads(t):
        return t.reshape(B, L, n_head, C // n_head).transpose(1, 2)
    for i, blk in enumerate(blocks):
        q, k, v = lin(blk["qkv"], x, norm=blk["ln1"]).split(C, dim=-1)
        y = block_decode_attention(heads(q), k_cache[i], v_cache[i], seq_lens, k_new=heads(k),
                                   v_new=heads(v))
        x = lin(blk["proj"], y.transpose(1, 2).reshape(B, L, C), residual=x)
        x = lin(blk["fc2"], lin(blk["fc1"], x, norm=blk["ln2"], act="gelu"), residual=x)
    return lin(head, x, norm=ln_f)


def keep_threshold(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p as one threshold: (tau, row_max), float32 [N, 1] each.

    logits: float32 [N, V]; top_k in [1, V]; top_p in (0, 1]. Kept tokens are
    ``logits >= tau``. With s a row sorted descending, e = exp(s - s_0) and z
    the sum of e over s >= s[k - 1] (every token tied with the k-th value
    counts): c = 1 + the number of i < k - 1 with e_0 + .. + e_i <= top_p * z
    (top_p as float32), and tau = s[c - 1]: the first token is always kept,
    and so is the token whose mass crosses top_p. top_p = 1: tau = s[k - 1].
    What ``sample_cpu.keep_threshold`` computes.
    """
    s = torch.sort(logits, dim=-1, descending=True).values
    row_max, kth = s[:, :1], s[:, top_k - 1:top_k]
    p = torch.tensor(top_p, dtype=torch.float32).item()
    if p >= 1.0:
        return kth, row_max
    e = torch.exp(s.double() - row_max.double())
    z = torch.where(s >= kth, e, 0.0).sum(-1, keepdim=True)
    cum = torch.cumsum(e[:, :top_k], dim=-1)
    c = (cum[:, :-1] <= p * z).sum(-1, keepdim=True) + 1
    return s.gather(1, c - 1), row_max


def draw_kept(logits: torch.Tensor, tau: torch.Tensor, row_max: torch.Tensor,
              u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over the kept tokens: int64 [N].

    logits: float32 [N, V]; tau, row_max: float32 [N, 1] (keep ``logits >= tau``;
    the row's largest logit); u: float64 [N] in [0, 1). Token i of a row is
    returned iff cdf[i - 1] <= u * cdf[-1] < cdf[i], cdf being the cumulative sum
    in vocabulary order of w = exp(logits - row_max) over kept tokens, 0 elsewhere:
    i is drawn with probability w_i / sum(w); if u * cdf[-1] rounds up to cdf[-1],
    the last kept token. What ``sample_cpu.draw_kept`` computes.
    """
    w = torch.where(logits >= tau, torch.exp(logits.double() - row_max.double()), 0.0)
    cdf = torch.cumsum(w, dim=-1)
    i = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(-1)
    V = logits.shape[-1]
    last_kept = V - 1 - (w > 0).flip(-1).int().argmax(-1)
    return torch.where(i < V, i, last_kept)


from .registry import register  # noqa: E402 (registration needs the functions above)

register(("block_causal_attention", "block_decode_attention", "kv_append_"), "reference",
         "nbp_kernels.reference")
