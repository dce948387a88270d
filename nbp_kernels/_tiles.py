"""Launch-geometry helpers shared by the Triton (``ops/``) and CUDA (``cuda_ops``) backends.

Free of triton and of the compiled extension, so either backend imports it alone.
"""
from __future__ import annotations

import functools

import torch


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device ``device_index``."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 8 for the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return num_sms(device.index if device.index is not None else torch.cuda.current_device())


def strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, seq) strides of a [B, H, S, D] tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)
