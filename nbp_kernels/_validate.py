"""Argument checks shared by every backend, run before any kernel launch."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_tensor(name: str, t, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        _fail(f"{name}: expected a {ndim}-D tensor [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], attr: str) -> None:
    first = getattr(tensors[0], attr)
    for n, t in zip(names[1:], tensors[1:]):
        if getattr(t, attr) != first:
            _fail(f"{n}: expected the same {attr} as {names[0]} ({first}), got {getattr(t, attr)}")


def check_block_args(block_size, cond_len, seq_len: int) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        _fail(f"block_size: expected a positive int, got {block_size!r}")
    if not isinstance(cond_len, int) or not 0 <= cond_len <= seq_len:
        _fail(f"cond_len: expected an int in [0, {seq_len}] (the sequence length), got {cond_len!r}")


def check_attention(q, k, v, block_size, cond_len) -> None:
    for n, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(n, t, ndim=4)
    check_same(("q", "k", "v"), (q, k, v), "shape")
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    check_block_args(block_size, cond_len, q.shape[2])


def check_cache(k_cache, v_cache, seq_lens, batch: int, heads: int, head_dim: int, device) -> None:
    for n, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(n, t, ndim=4)
        if t.shape[0] != batch or t.shape[1] != heads or t.shape[3] != head_dim:
            _fail(f"{n}: expected shape [{batch}, {heads}, max_seq, {head_dim}], got {tuple(t.shape)}")
        if t.device != device:
            _fail(f"{n}: expected device {device}, got {t.device}")
        if t.stride(-1) != 1:
            _fail(f"{n}: expected the last dimension to be contiguous (stride 1), got strides {t.stride()}")
    check_same(("k_cache", "v_cache"), (k_cache, v_cache), "shape")
    check_same(("k_cache", "v_cache"), (k_cache, v_cache), "dtype")
    check_tensor("seq_lens", seq_lens, ndim=None, dtypes=(torch.int32,))
    if seq_lens.shape != (batch,):
        _fail(f"seq_lens: expected an int32 tensor of shape [{batch}], got shape {tuple(seq_lens.shape)}")
    if seq_lens.device != device:
        _fail(f"seq_lens: expected device {device}, got {seq_lens.device}")


def check_new_block(name: str, t, like_shape, cache) -> None:
    check_tensor(name, t, ndim=4)
    if tuple(t.shape) != tuple(like_shape):
        _fail(f"{name}: expected shape {tuple(like_shape)}, got {tuple(t.shape)}")
    if t.device != cache.device:
        _fail(f"{name}: expected device {cache.device}, got {t.device}")


def check_capacity(seq_lens: torch.Tensor, block_size: int, max_seq: int) -> None:
    """Raise if any ``seq_lens[b] + block_size`` exceeds the cache (one host sync)."""
    lo, hi = int(seq_lens.min()), int(seq_lens.max())
    if lo < 0:
        _fail(f"seq_lens: expected non-negative lengths, got min {lo}")
    if hi + block_size > max_seq:
        _fail(f"cache overflow: seq_lens.max() + block_size = {hi} + {block_size} = {hi + block_size} "
              f"exceeds the cache's max_seq {max_seq}")


def check_decode(q, k_cache, v_cache, seq_lens, k_new, v_new, check_bounds: bool) -> None:
    check_tensor("q", q, ndim=4)
    B, H, L, D = q.shape
    check_cache(k_cache, v_cache, seq_lens, B, H, D, q.device)
    if (k_new is None) != (v_new is None):
        _fail("k_new, v_new: pass both or neither")
    if k_new is not None:
        check_new_block("k_new", k_new, q.shape, k_cache)
        check_new_block("v_new", v_new, q.shape, k_cache)
    if L > k_cache.shape[2]:
        _fail(f"q: block of {L} queries is longer than the cache's max_seq {k_cache.shape[2]}")
    if check_bounds:
        check_capacity(seq_lens, L, k_cache.shape[2])


def check_append(k_cache, v_cache, k_new, v_new, seq_lens, check_bounds: bool) -> None:
    check_tensor("k_new", k_new, ndim=4)
    B, H, L, D = k_new.shape
    check_cache(k_cache, v_cache, seq_lens, B, H, D, k_new.device)
    check_new_block("v_new", v_new, k_new.shape, k_cache)
    if check_bounds:
        check_capacity(seq_lens, L, k_cache.shape[2])
