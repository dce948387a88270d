"""Incremental decoding of latent frames into video frames as they complete.

The tokenizer's decoder is causal in time: every ``CausalConv3d`` pads
``2 * (k // 2)`` frames in front (copies of the first frame) and none behind,
GroupNorm runs on each frame alone, and ``DepthToSpace3D`` turns each latent
frame into ``tb`` frames (only the very first latent frame into one). So the
frames of latent frame ``t`` depend on latent frames ``0..t`` only, and a
decoder that keeps, for each causal conv, the last ``2 * (k // 2)`` frames it
has seen can decode a video chunk by chunk:

* the first chunk is padded with copies of its first frame, as the whole-video
  decode pads it;
* every later chunk is preceded by the kept frames instead of padding.

Concatenating the chunks' frames gives the whole-video decode within float
rounding (``tests/test_streaming.py``), with memory bounded by one chunk and
the kept frames, not by the video's length.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tokenizer import (CausalConv3d, DepthToSpace3D, GroupNorm3D, ResidualUnit, Swish,
                        VideoTokenizer)

__all__ = ["StreamingDecoder"]

_STATELESS = (GroupNorm3D, Swish, nn.Conv3d, nn.Identity)


class StreamingDecoder:
    """Decode latent frames chunk by chunk, keeping each causal conv's last input frames.

    ``push(indices)`` takes the next latent frames, int64 [B, t, h, w] (t >= 1),
    and returns their video frames, float32 [B, C, n, H, W] in [0, 1] with
    ``n = 1 + f_t * (t - 1)`` for the first chunk and ``f_t * t`` after it.
    ``reset()`` starts a new video. The tokenizer must stay unchanged (and in
    eval mode) while a video is streamed.
    """

    def __init__(self, tokenizer: VideoTokenizer):
        if not isinstance(tokenizer, VideoTokenizer):
            raise ValueError(f"tokenizer: expected a VideoTokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self._kept: dict[int, torch.Tensor] = {}
        self.frames_in = 0    # latent frames pushed since the last reset
        self._batch = 0

    def reset(self) -> None:
        self._kept.clear()
        self.frames_in = 0

    @torch.no_grad()
    def push(self, indices: torch.Tensor) -> torch.Tensor:
        tok = self.tokenizer
        tok._check_indices(indices)
        if self.frames_in and indices.shape[0] != self._batch:
            raise ValueError(f"indices: batch {indices.shape[0]} differs from the stream's "
                             f"{self._batch}; call reset() to start a new video")
        self._batch = indices.shape[0]
        x = tok._to_params(tok.indices_to_codes(indices))
        for layer in tok.decoder_layers:
            x = self._run(layer, x)
        self.frames_in += indices.shape[1]
        return x.float().clamp_(0, 1)

    def _run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(module, CausalConv3d):
            return self._conv(module, x)
        if isinstance(module, DepthToSpace3D):
            return module(x, first=self.frames_in == 0)
        if isinstance(module, nn.Sequential):
            for m in module:
                x = self._run(m, x)
            return x
        if isinstance(module, ResidualUnit):
            return self._run(module.fn, x) + self._run(module.residual_fn, x)
        if isinstance(module, _STATELESS):
            return module(x)
        raise ValueError(f"tokenizer: cannot stream through a {type(module).__name__} layer")

    def _conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        """The causal conv over [kept frames, x]: the time padding of a whole-video decode."""
        front = conv.padding[4]
        if front:
            kept = self._kept.get(id(conv))
            if kept is None:   # the video's start: replicate its first frame, as F.pad does
                kept = x[:, :, :1].expand(-1, -1, front, -1, -1)
            x = torch.cat([kept, x], dim=2)
            self._kept[id(conv)] = x[:, :, -front:]
        p = conv.padding
        if any(p[:4]):
            x = F.pad(x, (*p[:4], 0, 0), mode="replicate")
        return conv.conv(x)
