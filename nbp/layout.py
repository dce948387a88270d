"""The token layout: how conditions, begin-of-video ids and video codes become model ids.

One definition, used by training (``nbp.train.transformer.build_sequences``),
the generator (``FastGenerator.predict_frames`` / ``generate_video`` /
``most_likely_class``) and the demo (``nbp.demo``).

Model ids (``TransformerConfig``): ``bov_id`` = 0 (models with ``bov``); hybrid
models use 1..L-1 as middle fillers; condition id c is ``cond_offset + c``;
video code v is ``video_offset + v``. Video codes are fed in block-major order
(``nbp.blocks``). A sequence is ``[condition, begin-of-video, video]`` with

* hybrid (UCF): one bov id; during training the fillers 1..L-1 follow the
  first L codes;
* bov without hybrid (the demo models): a whole block of L bov ids, so the
  video starts on a block boundary and every code is a training target;
* neither (K600): no bov id; the first block of codes is never a target and
  generation starts from given frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .blocks import from_block_order, to_block_order
from .config import TransformerConfig

__all__ = ["Prompt", "condition_ids", "bov_ids", "codes_to_ids", "ids_to_codes", "given_frames",
           "teacher_forced", "training_sequences", "class_scoring_sequences",
           "check_frame_prediction", "frame_prediction_prompt", "video_prompt", "IGNORE"]

IGNORE = -100   # target of a position that predicts nothing (cross_entropy's ignore_index)


@dataclass(frozen=True)
class Prompt:
    """A generation request in model ids.

    ids: int64 [B, S], fed to ``FastGenerator.generate_tokens`` (condition first,
    ``cond_len`` of them); given: int64 [B, n] video ids already known (the start
    of the block-major grid, n = 0 for whole-video generation); num_new_tokens:
    video ids still to generate, so n + num_new_tokens = ``config.video_len``.
    """

    ids: torch.Tensor
    cond_len: int
    given: torch.Tensor
    num_new_tokens: int

    def video_ids(self, new: torch.Tensor) -> torch.Tensor:
        """The whole grid's ids int64 [B, video_len]: the given ids, then ``new`` [B, num_new_tokens]."""
        return torch.cat([self.given.to(new.device), new], dim=1)


def _int_ids(name: str, value) -> torch.Tensor:
    """``value`` as int64; refuses floats and bools (1.5 must not become class 1)."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: expected integer ids, got {value!r} ({e})") from None
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name}: expected integer ids, got {t.dtype} values {t.flatten()[:8].tolist()}")
    return t.long()


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise ValueError(f"batch_size: expected None or a positive int, got {batch_size!r}")


def _check_range(name: str, ids: torch.Tensor, K: int) -> None:
    if ids.numel() == 0:
        raise ValueError(f"{name}: expected at least one sample, got none")
    if int(ids.min()) < 0 or int(ids.max()) >= K:
        raise ValueError(f"{name}: expected ids in [0, {K}), got {ids.flatten()[:8].tolist()}")


def condition_ids(cfg: TransformerConfig, class_ids=None, cond_ids=None, *,
                  batch_size: int | None = None) -> torch.Tensor:
    """Condition model ids int64 [B, cond_len] (on the ids' device), shifted by ``cfg.cond_offset``.

    class_ids: ints [B] (models with cond_len 1); cond_ids: ints [B, cond_len]
    (e.g. text tokens); neither for unconditional models (B = batch_size, default
    1). When both ``batch_size`` and ids are given, B must agree.
    """
    _check_batch_size(batch_size)
    if class_ids is not None and cond_ids is not None:
        raise ValueError("class_ids, cond_ids: pass at most one")
    C, K = cfg.cond_len, cfg.cond_vocab_size
    if class_ids is None and cond_ids is None:
        if C:
            raise ValueError(f"class_ids, cond_ids: this model is conditional ({C} condition "
                             f"token{'s' if C > 1 else ''}); pass class_ids (one class in "
                             f"[0, {K}) per sample) or cond_ids [batch, {C}]")
        return torch.empty(batch_size or 1, 0, dtype=torch.long)
    if class_ids is not None:
        name, ids = "class_ids", _int_ids("class_ids", class_ids)
        if C != 1:
            raise ValueError(f"class_ids: this model's condition is {C} tokens (not one class "
                             f"token); pass cond_ids [batch, {C}]" if C else
                             "class_ids: this model is unconditional (cond_len = 0)")
        if ids.dim() > 1:
            raise ValueError(f"class_ids: expected one class per sample [batch], got shape "
                             f"{tuple(ids.shape)}")
        ids = ids.reshape(-1, 1)
    else:
        name, ids = "cond_ids", _int_ids("cond_ids", cond_ids)
        if C == 0:
            raise ValueError("cond_ids: this model is unconditional (cond_len = 0)")
        if ids.dim() != 2 or ids.shape[1] != C:
            raise ValueError(f"cond_ids: expected shape [batch, {C}], got {tuple(ids.shape)}")
    _check_range(name, ids, K)
    if batch_size is not None and ids.shape[0] != batch_size:
        raise ValueError(f"{name}: expected one per sample ({batch_size}), got {ids.shape[0]}")
    return ids + cfg.cond_offset


def bov_ids(cfg: TransformerConfig, batch: int, device=None) -> torch.Tensor:
    """Begin-of-video ids int64 [batch, n]: n = 1 (hybrid), L (bov without hybrid) or 0."""
    n = 1 if cfg.hybrid else cfg.block_size * int(cfg.bov)
    return torch.full((batch, n), cfg.bov_id, dtype=torch.long, device=device)


def codes_to_ids(cfg: TransformerConfig, codes: torch.Tensor, *, name: str = "codes") -> torch.Tensor:
    """Raster codes int [B, t', h, w] (t' <= t, whole blocks of bt) -> block-major model ids
    int64 [B, t'*h*w], the start of the model's grid. ``name``: the argument errors blame."""
    (t, h, w), bt = cfg.latent_shape, cfg.block_shape[0]
    if codes.dim() != 4 or tuple(codes.shape[2:]) != (h, w) or codes.shape[1] > t \
            or codes.shape[1] % bt:
        raise ValueError(f"{name}: expected codes [batch, t', {h}, {w}] with t' <= {t} a multiple of "
                         f"{bt} (whole blocks of {cfg.block_shape} starting the grid "
                         f"{cfg.latent_shape}), got {tuple(codes.shape)}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= cfg.codebook_size:
        raise ValueError(f"{name}: expected codes in [0, codebook_size={cfg.codebook_size}), "
                         f"got [{lo}, {hi}]")
    return to_block_order(codes.long(), cfg.block_shape) + cfg.video_offset


def ids_to_codes(cfg: TransformerConfig, ids: torch.Tensor) -> torch.Tensor:
    """Block-major model ids int [B, video_len] -> raster codes int64 [B, t, h, w].

    Ids outside the video range (a trained model does not emit them) are clamped
    to the nearest code so that random-weight models still decode.
    """
    if ids.dim() != 2 or ids.shape[1] != cfg.video_len:
        raise ValueError(f"ids: expected [batch, video_len={cfg.video_len}], got {tuple(ids.shape)}")
    codes = (ids.long() - cfg.video_offset).clamp_(0, cfg.codebook_size - 1)
    return from_block_order(codes, cfg.latent_shape, cfg.block_shape)


def given_frames(video: torch.Tensor, num_cond_frames: int, time_factor: int) -> torch.Tensor:
    """The given frames float [B, 3, num_cond_frames, H, W] of ``video`` float [B, 3, T, H, W].

    Checks that the frames are finite floats in [0, 1] and that ``num_cond_frames``
    = 1 + time_factor * k (whole latent frames of a causal tokenizer), at most T.
    """
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[0] < 1:
        got = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"video: expected a float tensor [batch, 3, T, H, W] in [0, 1], got {got}")
    if not video.is_floating_point():
        raise ValueError(f"video: expected float values in [0, 1], got {video.dtype} (8-bit "
                         f"pixels: divide by 255)")
    ft, T = time_factor, video.shape[2]
    if not isinstance(num_cond_frames, int) or isinstance(num_cond_frames, bool) \
            or num_cond_frames < 1 or (num_cond_frames - 1) % ft or num_cond_frames > T:
        raise ValueError(f"num_cond_frames: expected 1 + {ft}k frames (whole latent frames) "
                         f"and at most T = {T}, got {num_cond_frames!r}")
    frames = video[:, :, :num_cond_frames]
    if not bool(torch.isfinite(frames).all()):
        raise ValueError("video: the given frames hold NaN or infinite values; expected finite "
                         "values in [0, 1]")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < 0 or hi > 1:
        hint = (" (0..255 pixels? divide by 255)" if hi > 1 and lo >= 0 else
                " (-1..1 values? map them with (x + 1) / 2)" if lo < 0 and hi <= 1 else "")
        raise ValueError(f"video: expected values in [0, 1], found [{lo:.4g}, {hi:.4g}]{hint}")
    return frames


def teacher_forced(cfg: TransformerConfig, cond: torch.Tensor,
                   video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing (input_ids, targets), both int64 [B, S], of the video ids that follow
    a condition.

    cond: condition model ids int64 [B, cond_len]; video: block-major model ids
    int64 [B, n] (the whole grid when training, given frames when scoring; n >= L).
    The sequence is ``[cond, bov, video]`` (hybrid: ``[cond, bov, video[:L],
    fillers 1..L-1, video[L:]]``); the model reads it without its last L ids and
    position p predicts id p + L. targets[:, :cond_len] = ``IGNORE``; after it
    every video id is a target except, without bov, the first block.
    """
    B, L, C = video.shape[0], cfg.block_size, cfg.cond_len
    if video.shape[1] < L:
        raise ValueError(f"video: expected at least one block (L={L}) of ids, got {video.shape[1]}")
    bov = bov_ids(cfg, B, video.device)
    cond = cond.to(video.device)
    if cfg.hybrid:
        fillers = torch.arange(1, L, device=video.device).expand(B, -1)
        seq = torch.cat([cond, bov, video[:, :L], fillers, video[:, L:]], dim=1)
        scored = video
    else:
        seq = torch.cat([cond, bov, video], dim=1)
        scored = seq[:, C + L:]
    input_ids = seq[:, :-L]
    if input_ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"model: sequences of {input_ids.shape[1]} tokens exceed max_seq_len "
                         f"{cfg.max_seq_len}")
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, C:] = scored
    return input_ids, targets


def training_sequences(cfg: TransformerConfig, codes: torch.Tensor,
                       cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training (input_ids, targets) int64 [B, S] of raster codes int [B, t, h, w] and raw
    condition ids int [B, cond_len] (None when ``cfg.cond_len == 0``); see ``teacher_forced``."""
    if codes.dim() != 4 or tuple(codes.shape[1:]) != cfg.latent_shape:
        raise ValueError(f"codes: expected [batch, *latent_shape={cfg.latent_shape}], got "
                         f"{tuple(codes.shape)}")
    z = codes_to_ids(cfg, codes)
    B, C = z.shape[0], cfg.cond_len
    if C:
        if cond is None or tuple(cond.shape) != (B, C):
            raise ValueError(f"cond: expected int ids [batch={B}, cond_len={C}], got "
                             f"{None if cond is None else tuple(cond.shape)}")
        c = _int_ids("cond", cond).to(z.device)
        _check_range("cond", c, cfg.cond_vocab_size)
        c = c + cfg.cond_offset
    else:
        c = z.new_empty(B, 0)
    return teacher_forced(cfg, c, z)


def class_scoring_sequences(cfg: TransformerConfig,
                            given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing (input_ids, targets) int64 [B * K, S] of given video ids int64 [B, n]
    under each of the K = cond_vocab_size classes: row b * K + k is video b with class k.
    Summing the targets' log-likelihood per row scores each class (cond_len 1 models)."""
    if cfg.cond_len != 1:
        raise ValueError(f"model: scoring classes needs a class-conditional model (cond_len 1), "
                         f"this one has cond_len {cfg.cond_len}")
    B, K = given.shape[0], cfg.cond_vocab_size
    classes = torch.arange(K, device=given.device).repeat(B)[:, None] + cfg.cond_offset
    return teacher_forced(cfg, classes, given.repeat_interleave(K, dim=0))


def check_frame_prediction(cfg: TransformerConfig) -> None:
    """Refuse hybrid models: their fillers follow the first block, so given frames are not a
    prefix of their sequence (they generate whole videos)."""
    if cfg.hybrid:
        raise ValueError("predict_frames: hybrid models (UCF layout) generate whole videos; use "
                         "generate_video")


def frame_prediction_prompt(cfg: TransformerConfig, cond: torch.Tensor,
                            given: torch.Tensor) -> Prompt:
    """Continue given frames: ``[cond, bov, given]`` (hybrid models are refused,
    ``check_frame_prediction``).

    cond: condition model ids int64 [B, cond_len] (``condition_ids``); given:
    block-major video ids int64 [B, n] (``codes_to_ids``), 0 < n < video_len.
    """
    check_frame_prediction(cfg)
    n = given.shape[1]
    if not 0 < n < cfg.video_len:
        raise ValueError(f"video: the given frames are {n} latent codes; expected fewer than the "
                         f"model's grid {cfg.latent_shape} ({cfg.video_len} codes)")
    if cond.shape[0] != given.shape[0]:
        raise ValueError(f"class_ids, cond_ids: expected one per video ({given.shape[0]}), got "
                         f"{cond.shape[0]}")
    ids = torch.cat([cond.to(given.device), bov_ids(cfg, given.shape[0], given.device), given], 1)
    return Prompt(ids, cfg.cond_len, given, cfg.video_len - n)


def video_prompt(cfg: TransformerConfig, cond: torch.Tensor) -> Prompt:
    """Generate a whole video: ``[cond, bov]`` (cond: model ids int64 [B, cond_len])."""
    if not cfg.bov:
        raise ValueError("generate_video: this model has no begin-of-video id, so it continues "
                         "given frames; use predict_frames")
    B = cond.shape[0]
    ids = torch.cat([cond, bov_ids(cfg, B, cond.device)], dim=1)
    return Prompt(ids, cfg.cond_len, cond.new_empty(B, 0), cfg.video_len)
