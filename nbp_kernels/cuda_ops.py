"""The ``cuda`` backend: hand-written CUDA kernels from ``csrc/`` (module ``nbp_kernels._C``).

Ops (semantics exactly ``nbp_kernels.reference``):

* ``block_decode_attention``: split-KV (flash-decoding) decode step with the
  fused in-place append. fp16/bf16 run on tensor cores (16-row query tiles:
  L = 16 is one tile, L = 1 a zero-padded tile, any other L <= 256 several
  tiles); fp32 runs on CUDA cores (kernel specialised for L = 1 and 16-row
  tiles otherwise). head_dim 64, 96 or 128. ``seq_lens`` is read on the device.
* ``kv_append_``: in-place block append (any dtype; head_dim * itemsize a
  multiple of 16 bytes).

``block_causal_attention`` is not implemented here: the registry falls back
to ``auto`` for it (``nbp_kernels.registry``).

The compiled module takes raw device pointers, strides and the current CUDA
stream, so it does not depend on torch's C++ ABI. Both ops are registered as
``torch.library`` custom ops (``nbp::cuda_block_decode_attention``,
``nbp::cuda_kv_append``) with fake implementations, so they trace under
``torch.compile`` and can be captured in CUDA graphs (run once before
capturing so the kernels are loaded).

Positions past ``max_seq`` are never written; with an unchecked overflow
(``check_bounds=False`` upstream) the keys attended are clamped to
``max_seq``, and negative lengths are clamped to 0 (memory-safe, not
meaningful).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._tiles import sm_count, strides3
from .registry import register

try:
    from . import _C
    _IMPORT_ERROR = ""
except ImportError as e:  # not built: the package still works without it
    _C = None
    _IMPORT_ERROR = str(e)

__all__ = ["block_decode_attention", "kv_append_", "is_available", "supports",
           "build_info", "arch_supported"]

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DECODE_HEAD_DIMS = (64, 96, 128)
MAX_BLOCK_LEN = 256
BUILD_HINT = "build it with: NBP_BUILD_CUDA=1 python setup.py build_ext --inplace"


def build_info() -> dict | None:
    """``{"archs": [...], "cuda_runtime": "13.0", ...}`` of the compiled module, or None if not built."""
    return None if _C is None else dict(_C.build_info())


def arch_supported(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether code compiled for ``archs`` (``sm_80``, ``sm_90a``, ``compute_90``) runs on ``capability``.

    ``sm_XY`` SASS runs on the same major with minor >= Y; ``sm_XYa`` only on
    exactly X.Y; ``compute_XY`` PTX is JIT-compiled on any X.Y or newer.
    """
    for a in archs:
        kind, _, num = a.partition("_")
        specific = num.endswith("a")
        major, minor = divmod(int(num.rstrip("a")), 10)
        if kind == "sm" and specific and tuple(capability) == (major, minor):
            return True
        if kind == "sm" and not specific and capability[0] == major and capability[1] >= minor:
            return True
        if kind == "compute" and tuple(capability) >= (major, minor):
            return True
    return False


def is_available(device) -> tuple[bool, str]:
    """(usable, reason) for this backend on ``device``."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the cuda backend needs a CUDA device, got {device}"
    if _C is None:
        return False, f"nbp_kernels._C is not built ({_IMPORT_ERROR}); {BUILD_HINT}"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    cap = torch.cuda.get_device_capability(device)
    archs = _C.build_info()["archs"]
    if not arch_supported(cap, archs):
        return False, (f"nbp_kernels._C was built for {archs}, but {torch.cuda.get_device_name(device)} "
                       f"is sm_{cap[0]}{cap[1]}; rebuild with NBP_CUDA_ARCHS including {cap[0]}{cap[1]}")
    return True, ""


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """A read-only input the kernels can address with 16-byte vectors (copied only if needed)."""
    row = t.element_size()
    if t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and all((s * row) % 16 == 0 for s in strides3(t)):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def supports(key) -> tuple[bool, str]:
    """(ok, why not): the decode kernel's limits on a registry key (checked at resolve time)."""
    if key.head_dim is not None and key.head_dim not in DECODE_HEAD_DIMS:
        return False, f"q: the cuda decode kernel supports head_dim in {DECODE_HEAD_DIMS}, got {key.head_dim}"
    if key.block_size is not None and key.block_size > MAX_BLOCK_LEN:
        return False, (f"q: the cuda decode kernel supports blocks of at most {MAX_BLOCK_LEN} queries, "
                       f"got block_size {key.block_size}")
    return True, ""


def supports_append(key) -> tuple[bool, str]:
    """(ok, why not): the append kernel moves 16-byte vectors along head_dim."""
    if key.head_dim is not None and key.dtype is not None:
        size = key.dtype.itemsize
        if (key.head_dim * size) % 16:
            return False, (f"k_new: the cuda append needs head_dim * itemsize to be a multiple of 16 "
                           f"bytes, got {key.head_dim} x {size}")
    return True, ""


def _check_launch(first: str, tensors) -> None:
    """The kernels take one dtype code and raw device pointers: a CPU tensor or a
    second dtype would be read out of bounds, so this stays on every call."""
    given = [(name, t) for name, t in tensors if t is not None]
    ref = given[0][1]
    for name, t in given:
        if t.dtype != ref.dtype:
            raise ValueError(f"{name}: the cuda backend expects the same dtype as {first} ({ref.dtype}), "
                             f"got {t.dtype}")
    for name, t in given:
        if t.device.type != "cuda":
            raise ValueError(f"{name}: the cuda backend expects CUDA tensors, got device {t.device}")


@torch.library.custom_op("nbp::cuda_block_decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
               k_new: Optional[torch.Tensor], v_new: Optional[torch.Tensor], scale: float,
               num_splits: int = 0) -> torch.Tensor:
    """The kernel launch; ``num_splits`` 0 picks the KV split count from the shape."""
    B, H, L, D = q.shape
    M = k_cache.shape[2]
    q = _kernel_ready(q)
    k_new = None if k_new is None else _kernel_ready(k_new)
    v_new = None if v_new is None else _kernel_ready(v_new)
    seq_lens = seq_lens.contiguous()
    out = torch.empty((B, H, L, D), dtype=q.dtype, device=q.device)
    splits = num_splits or _C.num_splits(B, H, L, M, D, DTYPE_CODES[q.dtype], sm_count(q.device))
    rows = B * H * L * splits
    part_o = torch.empty(rows * D if splits > 1 else 0, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(rows if splits > 1 else 0, dtype=torch.float32, device=q.device)
    zero = (0, 0, 0)
    with torch.cuda.device(q.device):
        _C.decode(q.data_ptr(), strides3(q), k_cache.data_ptr(), strides3(k_cache),
                  v_cache.data_ptr(), strides3(v_cache),
                  0 if k_new is None else k_new.data_ptr(), zero if k_new is None else strides3(k_new),
                  0 if v_new is None else v_new.data_ptr(), zero if v_new is None else strides3(v_new),
                  out.data_ptr(), strides3(out), seq_lens.data_ptr(), B, H, L, M, D,
                  DTYPE_CODES[q.dtype], float(scale), splits,
                  part_o.data_ptr() if splits > 1 else 0, part_o.numel(),
                  part_lse.data_ptr() if splits > 1 else 0, part_lse.numel(),
                  torch.cuda.current_stream(q.device).cuda_stream)
    return out


@_decode_op.register_fake
def _decode_fake(q, k_cache, v_cache, seq_lens, k_new, v_new, scale, num_splits=0):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("nbp::cuda_kv_append", mutates_args=("k_cache", "v_cache"))
def _append_op(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               seq_lens: torch.Tensor) -> None:
    B, H, L, D = k_new.shape
    k_new, v_new = _kernel_ready(k_new), _kernel_ready(v_new)
    seq_lens = seq_lens.contiguous()
    with torch.cuda.device(k_new.device):
        _C.append(k_cache.data_ptr(), strides3(k_cache), v_cache.data_ptr(), strides3(v_cache),
                  k_new.data_ptr(), strides3(k_new), v_new.data_ptr(), strides3(v_new),
                  seq_lens.data_ptr(), B, H, L, k_cache.shape[2], D, DTYPE_CODES[k_new.dtype],
                  torch.cuda.current_stream(k_new.device).cuda_stream)


@_append_op.register_fake
def _append_fake(k_cache, v_cache, k_new, v_new, seq_lens):
    return None


def block_decode_attention(q, k_cache, v_cache, seq_lens, *, k_new=None, v_new=None, scale=None):
    """One decode step (see ``reference.block_decode_attention``).

    q: [B, H, L, D] fp32/fp16/bf16, D in {64, 96, 128}, L <= 256; k_cache,
    v_cache: [B, H, M, D], same dtype, last dim contiguous (updated in place
    when k_new/v_new, [B, H, L, D], are given); seq_lens: int32 [B] on the
    same device. Returns [B, H, L, D] (contiguous) in q's dtype. Shapes are
    validated by the public wrapper ``nbp_kernels.block_decode_attention``.
    """
    _check_launch("q", (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                        ("v_new", v_new)))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return torch.ops.nbp.cuda_block_decode_attention(q, k_cache, v_cache, seq_lens, k_new, v_new, scale)


def kv_append_(k_cache, v_cache, k_new, v_new, seq_lens):
    """In-place append (see ``reference.kv_append_``).

    k_cache, v_cache: [B, H, M, D]; k_new, v_new: [B, H, L, D], all one dtype,
    D * itemsize a multiple of 16 bytes; seq_lens: int32 [B]. Shapes are
    validated by the public wrapper ``nbp_kernels.kv_append_``.
    """
    _check_launch("k_cache", (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new),
                              ("v_new", v_new)))
    torch.ops.nbp.cuda_kv_append(k_cache, v_cache, k_new, v_new, seq_lens)


register("block_decode_attention", "cuda", block_decode_attention, available=is_available,
         supports=supports)
register("kv_append_", "cuda", kv_append_, available=is_available, supports=supports_append)
