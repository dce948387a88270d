"""Attention implementations compared by gpu_table.py (and FlexAttention's NBP mask for the suite).

Each builder returns ``{name: callable_or_skip_reason}``: a zero-argument
callable that runs one call of that implementation on prebuilt inputs, or a
string saying why the implementation cannot run here.
"""
import torch
import torch.nn.functional as F

from nbp_kernels import reference, torch_ops
from nbp_kernels.registry import backend_status


def triton_ops(device: torch.device, interpreter_ok: bool = False):
    """The Triton backend module, or the reason it is unusable.

    The CPU interpreter is no speed measurement; ``interpreter_ok`` admits it
    for smoke runs of the table code (``gpu_table.py --tiny``).
    """
    ok, why = backend_status("triton", device)
    if not ok:
        return why
    if device.type != "cuda" and not interpreter_ok:
        return "triton on CPU runs in the interpreter only: not a speed measurement"
    import nbp_kernels.ops as ops
    return ops


def nbp_mask_mod(block_size: int, cond_len: int, hybrid: bool):
    """FlexAttention mask_mod of the NBP mask: key j visible to query i iff j < kv_end(i)."""
    def mask_mod(b, h, q_idx, kv_idx):
        v = q_idx - cond_len
        end = cond_len + (torch.div(v, block_size, rounding_mode="floor") + 1) * block_size
        if hybrid:
            end = torch.where(v < block_size, q_idx + 1, end)
        end = torch.where(v < 0, torch.full_like(end, cond_len), end)
        return kv_idx < end
    return mask_mod


def visible_pairs(S: int, block_size: int, cond_len: int = 0, hybrid: bool = False) -> int:
    """Number of (query, key) pairs the NBP mask shows: the useful work of one head."""
    return int(reference.nbp_mask(S, block_size=block_size, cond_len=cond_len, hybrid=hybrid).sum())


def _flex(q, k, v, block_size, cond_len, hybrid):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return f"FlexAttention unavailable: {e}"
    if q.device.type != "cuda":
        return "FlexAttention on CPU runs unfused (eager) or needs a long inductor C++ build: CUDA only"
    S = q.shape[2]
    mask = create_block_mask(nbp_mask_mod(block_size, cond_len, hybrid), None, None, S, S,
                             device=str(q.device))
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda: fn(q, k, v, block_mask=mask)


def prefill_impls(q, k, v, *, block_size: int, cond_len: int = 0, hybrid: bool = False,
                  interpreter_ok: bool = False) -> dict:
    """q, k, v: [B, H, S, D] -> implementations of NBP-masked attention (+ plain causal SDPA)."""
    kw = dict(block_size=block_size, cond_len=cond_len, hybrid=hybrid)
    ops = triton_ops(q.device, interpreter_ok)
    mask = reference.nbp_mask(q.shape[2], device=q.device, **kw)
    impls = {
        "triton": ops if isinstance(ops, str) else (lambda: ops.block_causal_attention(q, k, v, **kw)),
        "torch": lambda: torch_ops.block_causal_attention(q, k, v, **kw),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "flex_block_mask": _flex(q, k, v, **kw),
    }
    if q.device.type == "cuda":  # a ceiling: the fastest fused kernel, on the (different) causal mask
        impls["sdpa_causal_ref"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return impls


def prefill_backward_impls(q, k, v, *, block_size: int, cond_len: int = 0, hybrid: bool = False,
                           interpreter_ok: bool = False) -> dict:
    """Forward + backward of the differentiable implementations (q, k, v require grad)."""
    out = {}
    impls = prefill_impls(q, k, v, block_size=block_size, cond_len=cond_len, hybrid=hybrid,
                          interpreter_ok=interpreter_ok)
    for name, fn in impls.items():
        if isinstance(fn, str) or name == "sdpa_causal_ref":
            continue
        def step(fn=fn):
            o = fn()
            torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        out[name] = step
    return out


def decode_impls(q, k_cache, v_cache, seq_lens, k_new, v_new, visible: int,
                 interpreter_ok: bool = False) -> dict:
    """One decode step. ``visible``: seq_lens[b] + L, the same for every sequence (host int)."""
    ops = triton_ops(q.device, interpreter_ok)
    impls = {}
    if isinstance(ops, str):
        impls["triton_fused_append"] = impls["triton"] = ops
    else:
        impls["triton_fused_append"] = lambda: ops.block_decode_attention(
            q, k_cache, v_cache, seq_lens, k_new=k_new, v_new=v_new)
        impls["triton"] = lambda: ops.block_decode_attention(q, k_cache, v_cache, seq_lens)
    impls["torch"] = lambda: torch_ops.block_decode_attention(q, k_cache, v_cache, seq_lens)
    impls["sdpa_sliced_cache"] = lambda: F.scaled_dot_product_attention(
        q, k_cache[:, :, :visible], v_cache[:, :, :visible])
    return impls


def append_impls(k_cache, v_cache, k_new, v_new, seq_lens, cached: int) -> dict:
    """In-place block append vs growing the cache with torch.cat (``cached`` valid positions)."""
    ops = triton_ops(k_new.device)
    return {
        "triton": ops if isinstance(ops, str) else (
            lambda: ops.kv_append_(k_cache, v_cache, k_new, v_new, seq_lens)),
        "torch_scatter": lambda: torch_ops.kv_append_(k_cache, v_cache, k_new, v_new, seq_lens),
        "torch_cat": lambda: (torch.cat([k_cache[:, :, :cached], k_new], 2),
                              torch.cat([v_cache[:, :, :cached], v_new], 2)),
    }
