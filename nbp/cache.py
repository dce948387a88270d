"""StaticKVCache: one preallocated key/value cache per (batch rows, max length).

The cache is written in place by ``nbp_kernels`` (``kv_append_`` at prefill,
the fused append of ``block_decode_attention`` at each decode step); it never
grows with ``torch.cat``. ``seq_lens`` lives on the cache's device so a decode
step reads and advances it without a host synchronisation.
"""
from __future__ import annotations

import torch

from .config import TransformerConfig

__all__ = ["StaticKVCache"]


class StaticKVCache:
    """Keys and values of every layer.

    k, v: [n_layer, batch, n_head, max_len, head_dim] in ``dtype`` (layer i's
    slice ``k[i]`` is a contiguous [batch, n_head, max_len, head_dim] cache as
    ``nbp_kernels`` expects). seq_lens: int32 [batch], the number of valid
    positions of each row.
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        for name, value in (("n_layer", n_layer), ("batch", batch), ("n_head", n_head),
                            ("max_len", max_len), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.seq_lens = torch.zeros(batch, device=device, dtype=torch.int32)

    @classmethod
    def for_model(cls, config: TransformerConfig, batch: int, max_len: int, *,
                  device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> "StaticKVCache":
        return cls(config.n_layer, batch, config.n_head, max_len, config.head_dim,
                   device=device, dtype=dtype)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def layer(self, i: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (k, v) caches [batch, n_head, length, head_dim], views of the storage.

        A shorter ``length`` lets attention read only the positions a request can
        reach; the view keeps the storage's strides (last dimension contiguous).
        """
        n = self.max_len if length is None else length
        return self.k[i, :, :, :n], self.v[i, :, :, :n]

    def reset(self) -> None:
        """Forget every row (the storage is reused; stale entries are overwritten)."""
        self.seq_lens.zero_()

    def check_capacity(self, batch: int, length: int) -> None:
        """Raise ValueError unless ``batch`` rows of ``length`` positions fit."""
        if batch != self.batch:
            raise ValueError(f"batch: the cache holds {self.batch} rows, the request needs {batch}")
        if length > self.max_len:
            raise ValueError(f"max_seq_len: the request needs {length} cached positions, the "
                             f"cache holds {self.max_len}; create the generator with a larger "
                             f"max_seq_len")
