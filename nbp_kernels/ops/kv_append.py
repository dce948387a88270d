"""In-place KV-cache block append in Triton: ``cache[b, :, seq_lens[b] + l] = new[b, :, l]``.

One program per (batch, head, row tile). The write offset is read from the
device tensor ``seq_lens`` inside the kernel, so no host synchronisation is
needed and the op can be captured in a CUDA graph. Stores are masked to the
block ``[seq_lens[b], seq_lens[b] + L)`` and to ``[0, max_seq)``: nothing else
in the cache is ever written, even when the caller skipped the capacity check.
"""
import torch

from .._tiles import next_pow2, strides3
from ._common import interpreting, last_dim_contiguous, tl, triton


@triton.jit(do_not_specialize=["L", "M"])
def _kv_append_kernel(KC, VC, KN, VN, SEQ, skcb, skch, skcs, svcb, svch, svcs,
                      sknb, sknh, skns, svnb, svnh, svns, H, L, M,
                      D: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    pos = tl.load(SEQ + b) + offs_l
    ok = (offs_l < L) & (pos >= 0) & (pos < M)
    mask = ok[:, None] & (offs_d[None, :] < D)
    kn = tl.load(KN + b * sknb + h * sknh + offs_l[:, None] * skns + offs_d[None, :], mask=mask)
    vn = tl.load(VN + b * svnb + h * svnh + offs_l[:, None] * svns + offs_d[None, :], mask=mask)
    tl.store(KC + b * skcb + h * skch + pos[:, None] * skcs + offs_d[None, :],
             kn.to(KC.dtype.element_ty), mask=mask)
    tl.store(VC + b * svcb + h * svch + pos[:, None] * svcs + offs_d[None, :],
             vn.to(VC.dtype.element_ty), mask=mask)


def append(k_cache, v_cache, k_new, v_new, seq_lens) -> None:
    """Launch the append kernel (in place).

    k_cache, v_cache: [B, H, M, D] (last dim contiguous); k_new, v_new:
    [B, H, L, D] any float dtype (cast to the cache dtype); seq_lens: int32 [B].
    """
    k_new, v_new = last_dim_contiguous(k_new), last_dim_contiguous(v_new)
    B, H, L, D = k_new.shape
    block_l = 16 if interpreting() else min(64, max(16, next_pow2(L)))
    grid = (B * H, triton.cdiv(L, block_l))
    _kv_append_kernel[grid](k_cache, v_cache, k_new, v_new, seq_lens, *strides3(k_cache),
                            *strides3(v_cache), *strides3(k_new), *strides3(v_new), H, L,
                            k_cache.shape[2], D=D, BLOCK_L=block_l, BLOCK_D=next_pow2(D),
                            num_warps=4)


@torch.library.custom_op("nbp::kv_append_", mutates_args=("k_cache", "v_cache"))
def _kv_append_op(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
                  v_new: torch.Tensor, seq_lens: torch.Tensor) -> None:
    append(k_cache, v_cache, k_new, v_new, seq_lens)


@_kv_append_op.register_fake
def _(k_cache, v_cache, k_new, v_new, seq_lens):
    return None


def kv_append_(k_cache, v_cache, k_new, v_new, seq_lens) -> None:
    """Write k_new/v_new ([B, H, L, D]) into the caches ([B, H, M, D]) at ``seq_lens[b]`` (int32 [B]).

    Arguments are validated by the public wrapper ``nbp_kernels.kv_append_``.
    """
    _kv_append_op(k_cache, v_cache, k_new, v_new, seq_lens)
