"""VideoTokenizer: the published MAGVIT-v2 style causal 3D CNN with FSQ.

State-dict compatible with the released ``magvit2_*.pt`` files (after the
``module.`` prefix is removed): ``encoder_layers.{i}`` and
``decoder_layers.{i}`` ModuleLists whose entries are, in order,

* ``CausalConv3d`` (weights under ``.conv``): replicate padding, ``k//2``
  on both sides of H and W, ``2*(k//2)`` frames in front only, then Conv3d;
* ``ResidualUnit``: ``fn`` = Sequential(GroupNorm3D, Swish, CausalConv3d,
  GroupNorm3D, Swish, CausalConv3d) plus ``residual_fn`` = Sequential(1x1x1
  CausalConv3d) only when the channel count changes;
* ``DepthToSpace3D`` (no weights; occupies an index in the decoder list);
* the final GroupNorm3D, Swish and (encoder) plain 1x1x1 ``nn.Conv3d`` or
  (decoder) CausalConv3d to RGB.

GroupNorm is applied to each frame separately. The architecture is generated
from :class:`TokenizerConfig` (stage widths, unit counts, strides), so a small
tokenizer can be trained with the same code.

Shapes: video ``[B, 3, T, H, W]`` float in [0, 1] with ``T = 1 + f_t * k``
(``f_t`` = product of the time strides, 4 for the published model) ->
indices ``[B, 1 + k, H / f_h, W / f_w]`` int64 (8 x 8 spatial reduction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, JsonConfig, check_int, check_ints
from .fsq import FSQ
from .pretrained import Pretrained

__all__ = ["TokenizerConfig", "TOKENIZER_PRESETS", "VideoTokenizer"]


@dataclass
class TokenizerConfig(JsonConfig):
    """Architecture of a :class:`VideoTokenizer`.

    The encoder runs stage ``i`` (``encoder_units[i]`` residual units at width
    ``encoder_channels[i]``; the first unit of a stage changes the width) and
    then a strided causal conv with ``strides[i]`` (t, h, w) between stages.
    The decoder mirrors it: stage ``i`` at ``decoder_channels[i]``, then a conv
    to ``width * prod(f)`` channels and a depth-to-space by ``f``, with ``f``
    running through ``strides`` in reverse order.
    """

    in_channels: int = 3
    encoder_channels: tuple = (128, 256, 256, 512)
    encoder_units: tuple = (4, 4, 4, 8)
    # The published decoder has 4 + 4 = 8 units of 512 before its first
    # upsampling (a description of the model lists 4); the released weights were saved
    # from the code, which has 8.
    decoder_channels: tuple = (512, 256, 256, 128)
    decoder_units: tuple = (8, 4, 4, 4)
    strides: tuple = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    kernel_size: int = 3
    norm_groups: int = 32
    fsq_levels: tuple = (8, 8, 8, 5, 5, 5)

    preset_kind = "tokenizer"

    @classmethod
    def presets(cls) -> dict:
        return TOKENIZER_PRESETS

    def __post_init__(self):
        for name in ("encoder_channels", "encoder_units", "decoder_channels", "decoder_units"):
            setattr(self, name, check_ints(name, getattr(self, name)))
        self.fsq_levels = check_ints("fsq_levels", self.fsq_levels, minimum=2)
        if not isinstance(self.strides, (list, tuple)):
            raise ConfigError(f"strides: expected a list of (t, h, w) strides, got {self.strides!r}")
        self.strides = tuple(check_ints(f"strides[{i}]", s, length=3) for i, s in enumerate(self.strides))
        if any(x not in (1, 2) for s in self.strides for x in s):
            raise ConfigError(f"strides: each entry must be three of 1 or 2 (t, h, w), got {self.strides!r}")
        for name in ("in_channels", "kernel_size", "norm_groups"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        n = len(self.strides) + 1
        for name in ("encoder_channels", "encoder_units", "decoder_channels", "decoder_units"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"{name}: expected {n} stages (len(strides) + 1), "
                                  f"got {len(getattr(self, name))}")
        if self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: expected a positive odd int, got {self.kernel_size!r}")
        for w in self.encoder_channels + self.decoder_channels:
            if w % self.norm_groups:
                raise ConfigError(f"norm_groups ({self.norm_groups}) must divide every stage width, "
                                  f"got widths {self.encoder_channels} / {self.decoder_channels}")

    @property
    def latent_dim(self) -> int:
        return len(self.fsq_levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.fsq_levels)

    @property
    def factors(self) -> tuple[int, int, int]:
        """Downsampling (f_t, f_h, f_w): T = 1 + f_t * k frames give 1 + k latent frames."""
        return tuple(math.prod(s[a] for s in self.strides) for a in range(3))

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent grid (t, h, w) of a video; ValueError when the video does not fit the factors."""
        ft, fh, fw = self.factors
        if frames < 1 or (frames - 1) % ft:
            raise ValueError(f"video: expected T = 1 + {ft}k frames (1, {1 + ft}, {1 + 2 * ft}, ...), "
                             f"got T = {frames}")
        if height < 1 or width < 1 or height % fh or width % fw:
            raise ValueError(f"video: expected H divisible by {fh} and W divisible by {fw}, "
                             f"got H = {height}, W = {width}")
        return 1 + (frames - 1) // ft, height // fh, width // fw

    def video_shape(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """Frames, height and width decoded from a latent grid (t, h, w)."""
        ft, fh, fw = self.factors
        return 1 + (t - 1) * ft, h * fh, w * fw


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # The released tokenizer (magvit2_ucf.pt, magvit2_k600.pt): 17x128x128 -> 5x16x16, 64000 codes.
    "magvit2": TokenizerConfig(),
    # For tests and CPU work: same topology, 8/16 channels; 4*4*4 = 64 codes
    # match the "tiny" transformer preset's codebook.
    "tiny": TokenizerConfig(encoder_channels=(8, 16, 16, 16), encoder_units=(1, 1, 1, 1),
                            decoder_channels=(16, 16, 16, 8), decoder_units=(1, 1, 1, 1),
                            norm_groups=4, fsq_levels=(4, 4, 4)),
}


# --- layers ------------------------------------------------------------------

class Swish(nn.Module):
    """x * sigmoid(beta * x) with a learnable per-channel beta [1, C, 1, 1, 1]."""

    def __init__(self, channels: int):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta * x)


class GroupNorm3D(nn.GroupNorm):
    """GroupNorm over each frame of [B, C, T, H, W] separately (statistics per (b, t))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.view(b, t, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Module):
    """Conv3d after replicate padding that is causal in time: [B, Cin, T, H, W] -> [B, Cout, T', H', W']."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride=(1, 1, 1)):
        super().__init__()
        p = kernel_size // 2
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_front, t_back).
        self.padding = (p, p, p, p, 2 * p, 0)
        self.conv = nn.Conv3d(c_in, c_out, kernel_size, stride=tuple(stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.padding):
            x = F.pad(x, self.padding, mode="replicate")
        return self.conv(x)


class ResidualUnit(nn.Module):
    """Pre-norm residual unit; ``residual_fn`` is a 1x1x1 conv when the width changes."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, groups: int):
        super().__init__()
        self.fn = nn.Sequential(
            GroupNorm3D(groups, c_in), Swish(c_in), CausalConv3d(c_in, c_out, kernel_size),
            GroupNorm3D(groups, c_out), Swish(c_out), CausalConv3d(c_out, c_out, kernel_size))
        self.residual_fn = (nn.Sequential(CausalConv3d(c_in, c_out, 1)) if c_in != c_out
                            else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + self.residual_fn(x)


class DepthToSpace3D(nn.Module):
    """[B, tb*hb*wb*C, T, H, W] -> [B, C, T*tb - (tb-1), H*hb, W*wb].

    Channels split as (tb, hb, wb, C) in that order; when time is upsampled
    the first tb-1 frames are dropped so the first latent frame stays one frame.
    """

    def __init__(self, factors):
        super().__init__()
        self.factors = tuple(factors)

    def forward(self, x: torch.Tensor, first: bool = True) -> torch.Tensor:
        """first: the chunk starts the video (False: a later chunk of a streamed
        decode, whose latent frames each expand to all ``tb`` frames)."""
        b, c, t, h, w = x.shape
        tb, hb, wb = self.factors
        c_out = c // (tb * hb * wb)
        x = x.view(b, tb, hb, wb, c_out, t, h, w).permute(0, 4, 5, 1, 6, 2, 7, 3)
        x = x.reshape(b, c_out, t * tb, h * hb, w * wb)
        return x[:, :, tb - 1:] if tb > 1 and first else x


def _encoder_layers(cfg: TokenizerConfig) -> list[nn.Module]:
    k, g = cfg.kernel_size, cfg.norm_groups
    prev = cfg.encoder_channels[0]
    layers: list[nn.Module] = [CausalConv3d(cfg.in_channels, prev, k)]
    for i, (width, units) in enumerate(zip(cfg.encoder_channels, cfg.encoder_units)):
        for _ in range(units):
            layers.append(ResidualUnit(prev, width, k, g))
            prev = width
        if i < len(cfg.strides):
            layers.append(CausalConv3d(width, width, k, stride=cfg.strides[i]))
    layers += [GroupNorm3D(g, prev), Swish(prev), nn.Conv3d(prev, cfg.latent_dim, 1)]
    return layers


def _decoder_layers(cfg: TokenizerConfig) -> list[nn.Module]:
    k, g = cfg.kernel_size, cfg.norm_groups
    prev = cfg.decoder_channels[0]
    ups = cfg.strides[::-1]
    layers: list[nn.Module] = [CausalConv3d(cfg.latent_dim, prev, k)]
    for i, (width, units) in enumerate(zip(cfg.decoder_channels, cfg.decoder_units)):
        for _ in range(units):
            layers.append(ResidualUnit(prev, width, k, g))
            prev = width
        if i < len(ups):
            layers += [CausalConv3d(width, width * math.prod(ups[i]), k), DepthToSpace3D(ups[i])]
    layers += [GroupNorm3D(g, prev), Swish(prev), CausalConv3d(prev, cfg.in_channels, k)]
    return layers


# --- the tokenizer -------------------------------------------------------------

class VideoTokenizer(Pretrained, nn.Module):
    """Causal 3D CNN autoencoder with FSQ; videos <-> int64 code indices.

    ``encode(video) -> indices`` and ``decode(indices) -> video``; the
    indices are what the generator's vocabulary calls video codes.
    """

    config_class = TokenizerConfig
    model_type = "nbp-tokenizer"
    # Layout of the activations on the CPU; the weights stay as they are and other devices
    # are left alone. torch.channels_last_3d spares GroupNorm3D's per-frame copy: on a
    # quiet 2-core Xeon it encoded a magvit2 clip in 18.0 s against 21.1 s (74% of the
    # fp32 matmul rate against 64%), decoded it in 25.4 s against 26.4 s, with less peak
    # memory (benchmarks/results/cpu_tokenizer_magvit2_*_quiet.json); the demo tokenizer
    # gives the same codes either way. Set torch.contiguous_format for the plain layout.
    cpu_memory_format: torch.memory_format = torch.channels_last_3d

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__()
        self.config = config if config is not None else TokenizerConfig()
        self.encoder_layers = nn.ModuleList(_encoder_layers(self.config))
        self.decoder_layers = nn.ModuleList(_decoder_layers(self.config))
        self.quantizer = FSQ(self.config.fsq_levels)

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def _to_params(self, x: torch.Tensor) -> torch.Tensor:
        """Move an input onto the parameters' device and dtype."""
        p = next(iter(self.parameters()))
        return x.to(device=p.device, dtype=p.dtype)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """A 5-D CPU activation in ``cpu_memory_format`` (no copy when it already is); others unchanged."""
        if x.device.type != "cpu" or x.dim() != 5 or self.cpu_memory_format == torch.contiguous_format:
            return x
        return x.contiguous(memory_format=self.cpu_memory_format)

    def _check_video(self, video: torch.Tensor) -> None:
        c = self.config.in_channels
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != c:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"video: expected a float tensor [batch, {c}, T, H, W], got {shape}")
        if not video.dtype.is_floating_point:
            raise ValueError(f"video: expected a float tensor with values in [0, 1], got {video.dtype}")
        self.config.latent_shape(*video.shape[2:])

    def _check_indices(self, codes: torch.Tensor) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 4 or min(codes.shape[1:]) < 1:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes: expected an int64 tensor [batch, t, h, w], got {shape}")
        if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
            raise ValueError(f"codes: expected an integer tensor of code indices, got {codes.dtype}")
        lo, hi = codes.min().item(), codes.max().item()
        if lo < 0 or hi >= self.codebook_size:
            raise ValueError(f"codes: expected indices in [0, {self.codebook_size}), got min {lo}, max {hi}")

    # --- continuous halves -----------------------------------------------------
    def encode_latents(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, C, T, H, W] float in [0, 1] -> latents [B, d, t, h, w], unquantized, contiguous.

        The input is moved to the parameters' device and dtype; so is the output.
        """
        self._check_video(video)
        x = self._layout(self._to_params(video))
        for layer in self.encoder_layers:
            x = self._layout(layer(x))
        return x.contiguous()

    def decode_latents(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantized codes [B, d, t, h, w] -> video [B, C, T, H, W] in the parameter dtype, contiguous, not clamped."""
        if codes.dim() != 5 or codes.shape[1] != self.config.latent_dim:
            raise ValueError(f"codes: expected [batch, {self.config.latent_dim}, t, h, w], "
                             f"got shape {tuple(codes.shape)}")
        x = self._layout(self._to_params(codes))
        for layer in self.decoder_layers:   # DepthToSpace3D's reshape returns the plain layout
            x = self._layout(layer(x))
        return x.contiguous()

    # --- discrete interface ------------------------------------------------------
    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, C, T, H, W] float in [0, 1], T = 1 + f_t k -> indices int64 [B, 1 + k, H/f_h, W/f_w]."""
        _, indices = self.quantizer(self.encode_latents(video))
        return indices

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """indices int [B, t, h, w] in [0, codebook_size) -> video float32 [B, C, 1 + f_t (t-1), f_h h, f_w w] in [0, 1]."""
        self._check_indices(codes)
        q = self.quantizer.indices_to_codes(codes).movedim(-1, 1)
        return self.decode_latents(q).float().clamp_(0, 1)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, d, t, h, w] -> (codes float32 [B, d, t, h, w], indices int64 [B, t, h, w])."""
        return self.quantizer(latents)

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Channel-first codes float [B, d, t, h, w] on the FSQ grid -> indices int64 [B, t, h, w]."""
        return self.quantizer.codes_to_indices(codes.movedim(1, -1))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """indices int [B, t, h, w] -> channel-first codes float32 [B, d, t, h, w]."""
        return self.quantizer.indices_to_codes(indices).movedim(-1, 1)

    def flops(self, frames: int, height: int, width: int) -> dict[str, int]:
        """Convolution FLOPs of one video ``[1, C, frames, height, width]``: ``{"encode": int, "decode": int}``.

        Each Conv3d (the 1x1x1 ones too) counts ``2 * Cin/groups * prod(kernel) *
        output elements``; norms, activations, padding and FSQ are not counted.
        The layers run on the meta device (no memory, no arithmetic), so every
        output shape is the one a real run has. Scales linearly with the batch.
        """
        t, h, w = self.config.latent_shape(frames, height, width)
        with torch.device("meta"):
            shadow = type(self)(self.config)
        counts = {"encode": 0, "decode": 0}
        phase = ["encode"]

        def count(conv: nn.Conv3d, inputs, out: torch.Tensor) -> None:
            counts[phase[0]] += 2 * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size) * out.numel()

        for m in shadow.modules():
            if isinstance(m, nn.Conv3d):
                m.register_forward_hook(count)
        with torch.no_grad():
            shadow.encode_latents(torch.empty(1, self.config.in_channels, frames, height, width, device="meta"))
            phase[0] = "decode"
            shadow.decode_latents(torch.empty(1, self.config.latent_dim, t, h, w, device="meta"))
        return counts

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: video [B, C, T, H, W] -> (reconstruction [B, C, T, H, W] unclamped, indices int64).

        Quantization uses a straight-through gradient, so the reconstruction
        is differentiable with respect to the encoder.
        """
        codes, indices = self.quantizer(self.encode_latents(video))
        return self.decode_latents(codes), indices
