"""The small demo models shipped inside the package (``nbp/assets/demo``).

``load_demo()`` is the single entry point: it returns the tokenizer and the two
class-conditional generators trained on ``nbp.data.synthetic`` clips (16x16,
17 frames, one bouncing sprite), one NBP (row blocks of 8 tokens) and one NTP
(one token per step) of the same size and training budget. ``MODEL_CARD.md``
beside the weights says how they were trained and what they score.

Token layout of the demo generators (``bov`` without hybrid, see
``nbp.train.transformer.build_sequences``): ``[class, bov x L, codes...]`` with
L = 8 for NBP and 1 for NTP, codes in raster order (row blocks). Two tasks:

* class-conditional generation: feed ``[class, bov x L]`` and generate the
  whole 9x8x8 latent grid;
* frame prediction (K600 protocol: 5 given frames, 12 predicted): feed
  ``[class, bov x L, codes of the 5 given frames]`` (3 latent frames: the
  tokenizer halves time after the first frame) and generate the remaining 6.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .blocks import from_block_order, to_block_order
from .data.synthetic import CLASS_NAMES, SyntheticVideos
from .generate import FastGenerator
from .model import NBPTransformer
from .tokenizer import VideoTokenizer

__all__ = ["DEMO_DIR", "DATA_OPTIONS", "TRAIN_SEED", "EVAL_SEED", "NUM_COND_FRAMES", "SAMPLING",
           "DemoModels", "load_demo", "heldout_clips", "condition_ids", "prediction_prompt",
           "predict_frames", "decode_tokens", "generate_class"]

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
# The synthetic data the demo models were trained on (SyntheticVideos defaults at 16x16,
# palette backgrounds).
DATA_OPTIONS = dict(resolution=16, num_frames=17, num_sprites=(1, 1), background="palette")
TRAIN_SEED = 0          # every training clip: render_clip(TRAIN_SEED, i)
EVAL_SEED = 1001        # held-out clips: a seed never used in training
NUM_COND_FRAMES = 5     # K600 frame prediction: 5 given frames, 12 predicted
# Sampling default of class-conditional generation: the tail of a 4x128 model's
# distribution over 1000 codes makes temperature-1 samples blotchy; top-5 keeps one
# clean sprite on a palette background (MODEL_CARD.md).
SAMPLING = dict(top_k=5)


@dataclass
class DemoModels:
    """tokenizer: VideoTokenizer; nbp / ntp: NBPTransformer (block (1,1,8) / (1,1,1)); path: the dir."""

    tokenizer: VideoTokenizer
    nbp: NBPTransformer
    ntp: NBPTransformer
    path: Path

    def model(self, which: str) -> NBPTransformer:
        if which not in ("nbp", "ntp"):
            raise ValueError(f"which: expected 'nbp' or 'ntp', got {which!r}")
        return self.nbp if which == "nbp" else self.ntp


def load_demo(path: str | Path | None = None, device="cpu", dtype=torch.float32) -> DemoModels:
    """Load the demo models (eval mode) from ``path`` (default: the shipped ``DEMO_DIR``).

    ``path`` holds native dirs ``tokenizer/``, ``nbp/`` and ``ntp/``. The weights are
    stored in float16 and cast to ``dtype`` (float32 by default) on load.
    """
    root = Path(path) if path is not None else DEMO_DIR
    missing = [d for d in ("tokenizer", "nbp", "ntp") if not (root / d / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"demo models: {str(root)!r} lacks {missing} (native dirs with "
                                f"config.json + model.safetensors; retrain with scripts/train_demo.sh)")
    tok = VideoTokenizer.from_pretrained(root / "tokenizer", device=device, dtype=dtype)
    nbp = NBPTransformer.from_pretrained(root / "nbp", device=device, dtype=dtype)
    ntp = NBPTransformer.from_pretrained(root / "ntp", device=device, dtype=dtype)
    for name, m in (("nbp", nbp), ("ntp", ntp)):
        c = m.config
        if c.cond_len != 1 or not c.bov or c.hybrid or c.codebook_size != tok.codebook_size:
            raise ValueError(f"demo models: {name}/ is not a class-conditional bov model over the "
                             f"tokenizer's {tok.codebook_size} codes")
    return DemoModels(tok, nbp, ntp, root)


def heldout_clips(num_clips: int, seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out clips: (video float32 [N, 3, 17, 16, 16] in [0, 1], labels int64 [N])."""
    if seed == TRAIN_SEED:
        raise ValueError(f"seed: {seed} is the training seed; held-out clips need another one")
    ds = SyntheticVideos(num_clips, seed=seed, **DATA_OPTIONS)
    items = [ds[i] for i in range(num_clips)]
    return (torch.stack([it["video"] for it in items]),
            torch.tensor([it["label"] for it in items], dtype=torch.int64))


def condition_ids(model: NBPTransformer, class_ids) -> torch.Tensor:
    """Model ids int64 [B, 1 + L] = [class, bov x L] that start a demo sequence."""
    cfg = model.config
    cls = torch.as_tensor(class_ids, dtype=torch.int64).reshape(-1, 1)
    if cls.numel() == 0 or int(cls.min()) < 0 or int(cls.max()) >= cfg.cond_vocab_size:
        raise ValueError(f"class_ids: expected ids in [0, {cfg.cond_vocab_size}) "
                         f"({', '.join(CLASS_NAMES[:2])}, ...), got {cls.flatten().tolist()}")
    bov = torch.full((cls.shape[0], cfg.block_size), cfg.bov_id, dtype=torch.int64)
    return torch.cat([cls + cfg.cond_offset, bov], dim=1)


def decode_tokens(gen: FastGenerator, tokens: torch.Tensor) -> torch.Tensor:
    """Model ids of the whole grid [B, t*h*w] (block order) -> video float32 [B, 3, T, H, W]."""
    cfg = gen.config
    codes = (tokens - cfg.video_offset).clamp_(0, cfg.codebook_size - 1)
    return gen.tokenizer.decode(from_block_order(codes, cfg.latent_shape, cfg.block_shape))


@torch.no_grad()
def prediction_prompt(gen: FastGenerator, video: torch.Tensor, class_ids, *,
                      num_cond_frames: int = NUM_COND_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the given frames: (prompt ids int64 [B, 1 + L + n], their codes' ids int64 [B, n]).

    video: float [B, 3, T, H, W] in [0, 1] (only the first ``num_cond_frames`` are read);
    class_ids: int [B]. The prompt is ``[class, bov x L, codes]`` in the model's id space.
    """
    cfg, tok = gen.config, gen.tokenizer
    ft = tok.config.factors[0]
    if not isinstance(num_cond_frames, int) or num_cond_frames < 1 or (num_cond_frames - 1) % ft:
        raise ValueError(f"num_cond_frames: expected 1 + {ft}k frames, got {num_cond_frames!r}")
    if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[2] < num_cond_frames:
        raise ValueError(f"video: expected a float tensor [batch, 3, T >= {num_cond_frames}, H, W]")
    codes = tok.encode(video[:, :, :num_cond_frames].to(gen.device))       # [B, n_lat, h, w]
    if tuple(codes.shape[2:]) != tuple(cfg.latent_shape[1:]) or codes.shape[1] >= cfg.latent_shape[0]:
        raise ValueError(f"video: encodes to {tuple(codes.shape[1:])}, which does not start the "
                         f"model's latent grid {cfg.latent_shape}")
    prefix = to_block_order(codes, cfg.block_shape) + cfg.video_offset
    cond = condition_ids(gen.model, class_ids).to(gen.device)
    if cond.shape[0] != prefix.shape[0]:
        raise ValueError(f"class_ids: expected one per video ({prefix.shape[0]}), got {cond.shape[0]}")
    return torch.cat([cond, prefix], dim=1), prefix


@torch.no_grad()
def predict_frames(gen: FastGenerator, video: torch.Tensor, class_ids, *,
                   num_cond_frames: int = NUM_COND_FRAMES, mode: str = "nbp",
                   **sampling) -> torch.Tensor:
    """Frame prediction with a demo generator.

    video: float [B, 3, T, H, W] in [0, 1] (only the first ``num_cond_frames`` are
    read); class_ids: int [B]. mode: "nbp" (blocks of L) or "ntp" (for the NTP
    model). ``sampling``: keyword arguments of ``FastGenerator.generate_tokens``
    (default greedy). Returns the decoded video float32 [B, 3, 17, 16, 16]: the
    tokenizer's reconstruction of the given frames, then the predicted ones.
    """
    prompt, prefix = prediction_prompt(gen, video, class_ids, num_cond_frames=num_cond_frames)
    sampling.setdefault("do_sample", False)
    new = gen.generate_tokens(prompt, gen.config.video_len - prefix.shape[1],
                              cond_len=gen.config.cond_len, mode=mode, **sampling)
    return decode_tokens(gen, torch.cat([prefix, new], dim=1))


@torch.no_grad()
def generate_class(gen: FastGenerator, class_ids, *, mode: str = "nbp", **sampling) -> torch.Tensor:
    """Class-conditional generation: class_ids int [B] -> video float32 [B, 3, 17, 16, 16].

    ``sampling``: keyword arguments of ``FastGenerator.generate_tokens`` (default:
    sampling with ``SAMPLING``, i.e. top-k 5).
    """
    sampling = {**SAMPLING, **sampling}
    cfg = gen.config
    cond = condition_ids(gen.model, class_ids).to(gen.device)
    new = gen.generate_tokens(cond, cfg.video_len, cond_len=cfg.cond_len, mode=mode, **sampling)
    return decode_tokens(gen, new)

