"""Videos longer than the model's trained length, with a rolling latent window.

A model trained on ``t`` latent frames (``config.latent_shape[0]``) reads at
most ``t`` latent frames at the positions it was trained on. To go further:

1. **First window.** The request as usual (given frames, or a whole video from
   the condition), generated up to ``t`` latent frames (fewer if the video is
   shorter). The cache simply grows, as in ``FastGenerator.predict_frames``.
2. **Later windows.** Keep the last ``W`` latent frames as context, build the
   frame-prediction request ``[condition, bov, codes of the W frames]``
   (``nbp.layout.frame_prediction_prompt``) so those frames sit at the
   positions the first ``W`` latent frames had in training, and generate the
   next ``t - W`` latent frames. The positions must shift, so the window is
   re-run from scratch (a re-prefill); the condition (class or text ids, and
   classifier-free guidance through the same ``cfg_scale``) is part of every
   window.

Window size ``W`` (latent frames of context): a multiple of the block's time
extent ``bt`` with ``bt <= W < t`` and ``[condition, bov, W + bt latent frames]``
inside the position table. The default is ``t - bt``: the most context that
still leaves one block-row of new latent frames per window, which is never less
than the frame-prediction protocol's given latent frames (2 of K600's 5 latent
frames, 3 of the demo's 9). Smaller windows re-prefill less often, with less
context.

Cost per new latent frame after the first window: one prefill of
``cond_len + bov + W*h*w`` tokens shared by the window's ``t - W`` new latent
frames, i.e. ``(cond_len + bov + W*h*w) / (t - W)`` prefill tokens per latent
frame (the default ``W = t - bt``: a whole prefill of the window per
``bt`` latent frames), plus the usual ``h*w / L`` decode steps against a
cache of at most ``t`` latent frames. Neither grows with the video: the cache
holds one window, never the video, and the context kept between windows is
the last ``W`` latent frames' codes.

Context as the model saw it in training (``reencode=True``): a causal
tokenizer encodes a video's first latent frame from one frame and every later
one from ``f_t`` frames, so a window that starts mid-video begins with a kind
of latent frame the model never saw first. ``reencode`` decodes the context's
``W`` latent frames (``1 + f_t (W - 1)`` frames) and encodes them again, so the
window starts like a training clip; it costs one decode and one encode of the
window per window. Off by default (the window is then exactly the last ``W``
latent frames); on the demo models it scores higher (``nbp eval --frames``,
MODEL_CARD.md).

Decoded frames come out through ``nbp.streaming.StreamingDecoder`` as their
latent frames complete: 1 frame for the video's first latent frame, then
``f_t`` (the tokenizer's time factor) per latent frame, equal to decoding the
whole video at once within float rounding.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from . import layout
from .blocks import from_block_order
from .config import TransformerConfig
from .streaming import StreamingDecoder

__all__ = [
    "LongVideoPlan",
    "check_window",
    "default_window",
    "generate_video",
    "latent_frames",
    "plan_long_video",
    "predict_frames",
    "stream_frames",
    "stream_latents",
    "window_prompt",
    "write_mp4_stream",
]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def latent_frames(num_frames, time_factor: int) -> int:
    """Latent frames of a video of ``num_frames`` = 1 + time_factor * k frames (k >= 0)."""
    if not _is_int(num_frames) or num_frames < 1 or (num_frames - 1) % time_factor:
        raise ValueError(f"num_frames: expected 1 + {time_factor}k frames (k >= 0: whole latent "
                         f"frames of the tokenizer, whose time factor is {time_factor}), got "
                         f"{num_frames!r}")
    return 1 + (num_frames - 1) // time_factor


def default_window(cfg: TransformerConfig) -> int:
    """``t - bt``: the largest window that leaves one block-row of new latent frames."""
    return cfg.latent_shape[0] - cfg.block_shape[0]


def _prefix_len(cfg: TransformerConfig) -> int:
    return cfg.cond_len + layout.bov_ids(cfg, 1).shape[1]


def check_window(cfg: TransformerConfig, window) -> int:
    """The window size W in latent frames (None: ``default_window``), checked.

    Raises ValueError unless W is a multiple of bt = ``block_shape[0]``, at least
    one block (bt), fits the position table together with one block-row of new
    frames, and is smaller than the trained length t.
    """
    (t, h, w), bt = cfg.latent_shape, cfg.block_shape[0]
    if window is None:
        window = default_window(cfg)
    if not _is_int(window):
        raise ValueError(f"window: expected None or an int number of latent frames, got {window!r}")
    if window < bt or window % bt:
        raise ValueError(f"window: expected at least one block of latent frames, a multiple of "
                         f"the block's time extent bt={bt} (block_shape {cfg.block_shape}), got "
                         f"{window}")
    # The last step's tokens are never fed back, so a window reads its prefix, W latent
    # frames and bt more minus one block of L (as check_generation_inputs counts).
    reads = _prefix_len(cfg) + (window + bt) * h * w - cfg.block_size
    if reads > cfg.max_seq_len:
        fits = (cfg.max_seq_len - _prefix_len(cfg) + cfg.block_size) // (h * w) // bt * bt - bt
        raise ValueError(f"window: {window} latent frames of context and {bt} new ones read "
                         f"{reads} positions, more than the model's position table (max_seq_len "
                         f"{cfg.max_seq_len}); expected at most {min(fits, t - bt)}")
    if window >= t:
        raise ValueError(f"window: expected fewer latent frames than the trained length t={t} "
                         f"(each window generates new frames at trained positions), got {window}")
    return window


@dataclass(frozen=True)
class LongVideoPlan:
    """num_latent: latent frames of the output video; window: W latent frames of context
    kept between windows; trained: t, latent frames per window; bt: block time extent."""

    num_latent: int
    window: int
    trained: int
    bt: int

    def first_new(self, given: int) -> int:
        """Latent frames the first window generates after ``given`` known ones (whole blocks)."""
        return self._blocks(min(self.trained, self.num_latent) - given)

    def next_new(self, done: int) -> int:
        """Latent frames a later window generates when ``done`` exist (whole blocks)."""
        return self._blocks(min(self.trained - self.window, self.num_latent - done))

    def _blocks(self, frames: int) -> int:
        return -(-frames // self.bt) * self.bt


def plan_long_video(cfg: TransformerConfig, time_factor: int, num_frames, window,
                    given: int = 0) -> LongVideoPlan:
    """Check a long-video request before any work: ``num_frames`` (1 + time_factor*k),
    ``window`` (``check_window``) and, for frame prediction, ``given`` latent frames."""
    num_latent = latent_frames(num_frames, time_factor)
    window = check_window(cfg, window)
    if num_latent <= given:
        raise ValueError(f"num_frames: expected more frames than the given ones ({given} latent "
                         f"frames = {1 + time_factor * (given - 1)} frames), got {num_frames}")
    if cfg.hybrid and num_latent > cfg.latent_shape[0]:
        raise ValueError(f"num_frames: hybrid models (UCF layout) generate whole videos of at most "
                         f"{1 + time_factor * (cfg.latent_shape[0] - 1)} frames; their fillers "
                         f"follow the first block, so a window of given frames is not a prefix of "
                         f"their sequence")
    return LongVideoPlan(num_latent, window, cfg.latent_shape[0], cfg.block_shape[0])


def window_prompt(cfg: TransformerConfig, cond: torch.Tensor,
                  context: torch.Tensor) -> layout.Prompt:
    """The request of a later window: ``[cond, bov, codes of the context]``.

    cond: condition model ids int64 [B, cond_len]; context: raster codes int64
    [B, W, h, w], the last W latent frames, placed at the positions of the first
    W latent frames of a training sequence.
    """
    given = layout.codes_to_ids(cfg, context, name="context")
    return layout.frame_prediction_prompt(cfg, cond, given)


def _window_codes(gen, prompt: layout.Prompt, frames: int, mode: str,
                  sampling: dict) -> Iterator[torch.Tensor]:
    """Generate ``frames`` latent frames after ``prompt``; yield raster codes int64
    [B, bt, h, w] as soon as each block-row of latent frames is drawn
    (``FastGenerator.stream_tokens``: no host synchronisation between steps)."""
    cfg = gen.config
    (_, h, w), bt = cfg.latent_shape, cfg.block_shape[0]
    row = bt * h * w   # a multiple of every step's token count (L, or 1 in "ntp")
    done = 0
    steps = gen.stream_tokens(prompt.ids, frames * h * w, cond_len=prompt.cond_len, mode=mode,
                              **sampling)
    for _, tokens in steps:
        done += tokens.shape[1]
        if done % row == 0:
            ids = steps.out[:, done - row:done]
            codes = (ids - cfg.video_offset).clamp_(0, cfg.codebook_size - 1)
            yield from_block_order(codes, (bt, h, w), cfg.block_shape)


def stream_latents(gen, first: layout.Prompt, plan: LongVideoPlan, *, mode: str = "nbp",
                   first_mode: str | None = None, reencode: bool = False,
                   **sampling) -> Iterator[torch.Tensor]:
    """Yield the video's latent frames, raster codes int64 [B, k, h, w], as they complete.

    first: the first window's request (``FastGenerator.frame_prompt`` or
    ``layout.video_prompt``); its given latent frames come out first. Later
    windows are ``window_prompt`` requests generated in ``mode``; ``first_mode``
    (default ``mode``) serves the first. reencode: re-encode each window's context
    (module docstring). ``sampling``: keyword arguments of
    ``FastGenerator.stream_tokens``, the same in every window (a ``generator`` keeps drawing
    from one stream). Yields ``plan.num_latent`` latent frames in all.
    """
    cfg = gen.config
    (_, h, w) = cfg.latent_shape
    cond = first.ids[:, :first.cond_len]
    given = first.given.shape[1] // (h * w)
    kept = []   # latent frames since the last window's start, raster codes [B, k, h, w]
    if given:
        codes = from_block_order(first.given - cfg.video_offset, (given, h, w), cfg.block_shape)
        kept.append(codes)
        yield codes
    done, prompt, frames, window_mode = given, first, plan.first_new(given), first_mode or mode
    while True:
        for codes in _window_codes(gen, prompt, frames, window_mode, sampling):
            take = min(codes.shape[1], plan.num_latent - done)
            if take:
                yield codes[:, :take]
            kept.append(codes)
            done += take
        if done >= plan.num_latent:
            return
        context = kept[0] = torch.cat(kept, 1)[:, -plan.window:]
        del kept[1:]
        if reencode:
            context = gen.tokenizer.encode(gen.tokenizer.decode(context))
        prompt, frames, window_mode = window_prompt(cfg, cond, context), plan.next_new(done), mode


def _tokenizer(gen):
    if gen.tokenizer is None:
        raise ValueError("tokenizer: long videos are encoded/decoded; create the FastGenerator "
                         "with tokenizer=...")
    return gen.tokenizer


def _decoded(tok, latents: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Decode each latent frame as it comes (``StreamingDecoder``): float32 [B, 3, n, H, W]."""
    stream = StreamingDecoder(tok)
    for codes in latents:
        for i in range(codes.shape[1]):
            yield stream.push(codes[:, i:i + 1])


def stream_frames(gen, video: torch.Tensor | None = None, num_cond_frames: int = 5, *,
                  num_frames: int, window: int | None = None, class_ids=None, cond_ids=None,
                  batch_size: int | None = None, mode: str | None = None,
                  reencode: bool = False, **sampling) -> Iterator[torch.Tensor]:
    """An iterator of decoded frames, float32 [B, 3, n, H, W] in [0, 1], one latent frame at a
    time: n = 1 for the video's first latent frame, then the tokenizer's time factor f_t.

    With ``video`` (float [B, 3, T, H, W] in [0, 1]): frame prediction from its first
    ``num_cond_frames`` frames (their reconstruction comes first), as
    ``FastGenerator.predict_frames``; without: a whole video from the condition, as
    ``FastGenerator.generate_video``. num_frames: length of the output video, 1 + f_t*k
    (any k); window: latent frames of context (module docstring; None: the default);
    reencode: re-encode each window's context (module docstring).
    mode: "nbp" (default; "hybrid" for the first window of hybrid models) or "ntp".
    ``sampling``: keyword arguments of ``FastGenerator.stream_tokens`` (do_sample,
    temperature, top_k, top_p, cfg_scale, cfg_schedule, generator). Every argument
    but those is checked here, before the iterator starts; the FastGenerator must
    not serve other requests until the iterator is exhausted (they share its cache).
    """
    tok, cfg = _tokenizer(gen), gen.config
    ft = tok.config.factors[0]
    plan_long_video(cfg, ft, num_frames, window)
    if not isinstance(reencode, bool):
        raise ValueError(f"reencode: expected True or False, got {reencode!r}")
    if video is None:
        cond = layout.condition_ids(cfg, class_ids, cond_ids, batch_size=batch_size)
        first = layout.video_prompt(cfg, cond.to(gen.device))
        first_mode = mode or ("hybrid" if cfg.hybrid else "nbp")
        mode = "nbp" if first_mode == "hybrid" else first_mode
    else:
        first = gen.frame_prompt(video, num_cond_frames, class_ids=class_ids, cond_ids=cond_ids)
        first_mode = mode = mode or "nbp"
    h, w = cfg.latent_shape[1:]
    plan = plan_long_video(cfg, ft, num_frames, window, first.given.shape[1] // (h * w))
    return _decoded(tok, stream_latents(gen, first, plan, mode=mode, first_mode=first_mode,
                                        reencode=reencode, **sampling))


def predict_frames(gen, video: torch.Tensor, num_cond_frames: int = 5, *, num_frames: int,
                   window: int | None = None, class_ids=None, cond_ids=None, mode: str = "nbp",
                   reencode: bool = False, **sampling) -> torch.Tensor:
    """Frame prediction to ``num_frames`` frames (``stream_frames``, concatenated): float32
    [B, 3, num_frames, H, W], the given frames' reconstruction then the predicted ones."""
    return torch.cat(list(stream_frames(gen, video, num_cond_frames, num_frames=num_frames,
                                        window=window, class_ids=class_ids, cond_ids=cond_ids,
                                        mode=mode, reencode=reencode, **sampling)), dim=2)


def generate_video(gen, class_ids=None, cond_ids=None, *, num_frames: int,
                   window: int | None = None, batch_size: int | None = None,
                   mode: str | None = None, reencode: bool = False, **sampling) -> torch.Tensor:
    """A whole video of ``num_frames`` frames from the condition (``stream_frames``,
    concatenated): float32 [B, 3, num_frames, H, W] in [0, 1]."""
    return torch.cat(list(stream_frames(gen, None, num_frames=num_frames, window=window,
                                        class_ids=class_ids, cond_ids=cond_ids,
                                        batch_size=batch_size, mode=mode, reencode=reencode,
                                        **sampling)), dim=2)


def write_mp4_stream(frames: Iterable[torch.Tensor], path: str | Path, *, fps: float = 8.0,
                     scale: int = 1, total: int | None = None,
                     counter: TextIO | None = None) -> int:
    """Write frames to an MP4 as they come (``stream_frames``); returns the frame count.

    frames: float [B, 3, n, H, W] (batches tiled side by side) or [3, n, H, W] in
    [0, 1], each chunk muxed at once; scale: nearest-neighbour upscaling. The file
    is a fragmented MP4 (``empty_moov``, a fragment per frame, flushed) encoded
    without lookahead, so it plays while it grows; for the same reason it is
    written in place, not atomically (a failed run leaves the frames written so
    far). ``counter``: a text stream (e.g. ``sys.stderr``) for a "frame i/total"
    line updated per chunk (None: silent).
    """
    import av
    import numpy as np

    from .io import video_to_uint8

    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"path: a stream is written as MP4, expected a .mp4 file name, got "
                         f"{str(path)!r}")
    if not fps > 0:
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    if not _is_int(scale) or scale < 1:
        raise ValueError(f"scale: expected a positive int, got {scale!r}")
    written, container, stream = 0, None, None
    try:
        for chunk in frames:
            if chunk.dim() == 5:
                chunk = torch.cat(list(chunk), dim=-1)
            chunk = chunk.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
            pixels = video_to_uint8(chunk)                       # [n, H, W, 3]
            h, w = pixels.shape[1:3]
            pixels = np.pad(pixels, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            if container is None:
                # A fragment per frame, flushed to the file at once: the MP4 plays as it grows.
                container = av.open(str(path), "w", options={
                    "movflags": "frag_keyframe+empty_moov+default_base_moof",
                    "frag_duration": "1", "flush_packets": "1"})
                stream = container.add_stream("libx264", rate=round(fps),
                                              options={"tune": "zerolatency"})
                stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
            for frame in pixels:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            written += len(pixels)
            if counter is not None:
                counter.write(f"\rframe {written}/{total if total else '?'}")
                counter.flush()
    finally:
        if container is not None:
            container.mux(stream.encode())
            container.close()
        if counter is not None and written:
            counter.write("\n")
    return written
