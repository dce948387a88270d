"""The ``triton`` backend of nbp_kernels: fused Triton kernels, registered as ``nbp::`` custom ops.

* ``block_causal_attention``: flash-attention forward + backward under the NBP mask
  (``nbp::block_causal_attention_fwd`` / ``_bwd``, differentiable via ``register_autograd``).
* ``block_decode_attention``: split-KV decode with a fused in-place append
  (``nbp::block_decode_attention``, ``nbp::block_decode_attention_append_``).
* ``kv_append_``: in-place block append (``nbp::kv_append_``).

Runs on CUDA tensors, and on CPU tensors in the Triton interpreter when
``TRITON_INTERPRET=1`` was set before triton was imported.
"""
from ..registry import register
from ._common import is_available, supports
from .block_causal_attention import block_causal_attention
from .block_decode_attention import block_decode_attention
from .kv_append import kv_append_

__all__ = ["block_causal_attention", "block_decode_attention", "kv_append_", "is_available"]

register("block_causal_attention", "triton", block_causal_attention, available=is_available,
         supports=supports)
register("block_decode_attention", "triton", block_decode_attention, available=is_available,
         supports=supports)
register("kv_append_", "triton", kv_append_, available=is_available)
