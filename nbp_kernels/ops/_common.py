"""Shared helpers of the Triton backend: availability, tile sizes, head-dim split.

Head dims that are not a power of two (96 in the 700M model) are split into
two power-of-two chunks, ``D = DA + DB`` (96 = 64 + 32, 80 = 64 + 16), each
chunk its own ``tl.dot``; so a 96-wide head costs 96 columns of matrix work,
not the 128 a padded ``tl.arange`` would. Only a remainder that is not a power
of two (e.g. 112 = 64 + 48 -> 64 + 64) is padded, with masked loads.
"""
import os

import torch

from .._tiles import next_pow2

try:
    import triton
    import triton.language as tl
    _TRITON_ERROR = ""
except ImportError as e:  # triton is optional on non-Linux platforms
    triton = None
    tl = None
    _TRITON_ERROR = str(e)

LOG2E = 1.4426950408889634
MIN_DOT = 16  # smallest tile edge tl.dot accepts on a GPU


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available(device) -> tuple[bool, str]:
    """(usable, reason): CUDA with triton importable, or CPU under TRITON_INTERPRET=1."""
    if triton is None:
        return False, f"triton is not importable: {_TRITON_ERROR}"
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:  # bf16 tensor-core dots and the tile sizes assume Ampere or newer
            return False, f"triton kernels need compute capability >= 8.0, got {major}.{minor}"
        return True, ""
    if device.type == "cpu" and interpreting():
        return True, ""
    if device.type == "cpu":
        return False, ("triton runs on CPU tensors only in the interpreter "
                       "(set TRITON_INTERPRET=1 before importing triton)")
    return False, f"triton backend supports cuda devices, got {device.type}"


MAX_HEAD_DIM = 256  # larger tiles would not fit a GPU's registers/shared memory


def supports(key) -> tuple[bool, str]:
    """(ok, why not): the attention kernels' limits on a registry key (checked at resolve time)."""
    if key.head_dim is not None and not 1 <= key.head_dim <= MAX_HEAD_DIM:
        return False, f"q: the triton backend supports head_dim in [1, {MAX_HEAD_DIM}], got {key.head_dim}"
    return True, ""


def head_split(d: int) -> tuple[int, int]:
    """(DA, DB): power-of-two chunk widths covering head_dim ``d`` (DB == 0: one chunk).

    DA is the largest power of two <= d (at least MIN_DOT); DB covers the rest.
    """
    da = max(MIN_DOT, 1 << (d.bit_length() - 1))
    rest = d - da
    if rest <= 0:
        return da, 0
    return da, max(MIN_DOT, next_pow2(rest))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in full precision ("ieee"), not TF32, to match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1 (views like transpose(1, 2) stay copy-free)."""
    return t if t.stride(-1) == 1 else t.contiguous()
