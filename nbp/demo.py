"""The small demo models shipped inside the package (``nbp/assets/demo``).

``load_demo()`` is the single entry point: it returns the tokenizer and the two
class-conditional generators trained on ``nbp.data.synthetic`` clips (16x16,
17 frames, one bouncing sprite), one NBP (row blocks of 8 tokens) and one NTP
(one token per step) of the same size and training budget. ``MODEL_CARD.md``
beside the weights says how they were trained and what they score.

Token layout of the demo generators (``bov`` without hybrid, see
``nbp.layout``): ``[class, bov x L, codes...]`` with
L = 8 for NBP and 1 for NTP, codes in raster order (row blocks). Two tasks:

* class-conditional generation: feed ``[class, bov x L]`` and generate the
  whole 9x8x8 latent grid;
* frame prediction (K600 protocol: 5 given frames, 12 predicted): feed
  ``[class, bov x L, codes of the 5 given frames]`` (3 latent frames: the
  tokenizer halves time after the first frame) and generate the remaining 6.

Videos longer than 17 frames (``nbp.long_video``'s rolling window) use a third
generator when the dir has it, ``nbp_long``: the NBP model fine-tuned on 9-latent-frame
windows of 65-frame clips, most of them starting mid-clip as every window after the
first does (``DemoModels.long_model``). ``nbp`` and ``ntp`` stay the equal-budget pair.

Both run through ``FastGenerator`` (``generate_video``, ``predict_frames``); the
helpers below only fix the demo's defaults. A clip without a label can take the
class ``FastGenerator.most_likely_class`` finds for it; for footage unlike these
sprites that class means nothing and the prediction is crude.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import layout
from .data.synthetic import SyntheticVideos
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
    """tokenizer: VideoTokenizer; nbp / ntp: NBPTransformer (block (1,1,8) / (1,1,1)); path: the dir;
    nbp_long: the NBP model fine-tuned for long videos (same config as nbp), None when the dir
    lacks ``nbp_long/``."""

    tokenizer: VideoTokenizer
    nbp: NBPTransformer
    ntp: NBPTransformer
    path: Path
    nbp_long: NBPTransformer | None = None

    def model(self, which: str) -> NBPTransformer:
        """The generator named ``which``: "nbp", "ntp" or "nbp_long" (when loaded)."""
        if which not in ("nbp", "ntp", "nbp_long"):
            raise ValueError(f"which: expected 'nbp', 'ntp' or 'nbp_long', got {which!r}")
        if which == "nbp_long" and self.nbp_long is None:
            raise ValueError(f"which: 'nbp_long' is not in {str(self.path)!r} (no nbp_long/ dir)")
        return getattr(self, which)

    def long_model(self) -> tuple[str, NBPTransformer]:
        """(name, model) of the NBP generator for videos past 17 frames: nbp_long, else nbp."""
        return ("nbp_long", self.nbp_long) if self.nbp_long is not None else ("nbp", self.nbp)


def load_demo(path: str | Path | None = None, device="cpu", dtype=torch.float32) -> DemoModels:
    """Load the demo models (eval mode) from ``path`` (default: the shipped ``DEMO_DIR``).

    ``path`` holds native dirs ``tokenizer/``, ``nbp/``, ``ntp/`` and optionally
    ``nbp_long/`` (its config must equal ``nbp/``'s). The weights are stored in float16
    and cast to ``dtype`` (float32 by default) on load.
    """
    root = Path(path) if path is not None else DEMO_DIR
    missing = [d for d in ("tokenizer", "nbp", "ntp") if not (root / d / "model.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"demo models: {str(root)!r} lacks {missing} (native dirs with "
                                f"config.json + model.safetensors; retrain with scripts/train_demo.sh)")
    tok = VideoTokenizer.from_pretrained(root / "tokenizer", device=device, dtype=dtype)
    nbp = NBPTransformer.from_pretrained(root / "nbp", device=device, dtype=dtype)
    ntp = NBPTransformer.from_pretrained(root / "ntp", device=device, dtype=dtype)
    nbp_long = None
    if (root / "nbp_long" / "model.safetensors").is_file():
        nbp_long = NBPTransformer.from_pretrained(root / "nbp_long", device=device, dtype=dtype)
        if nbp_long.config != nbp.config:
            raise ValueError("demo models: nbp_long/ must have nbp/'s config (it is nbp fine-tuned "
                             "on windows of long clips)")
    for name, m in (("nbp", nbp), ("ntp", ntp)):
        c = m.config
        if c.cond_len != 1 or not c.bov or c.hybrid or c.codebook_size != tok.codebook_size:
            raise ValueError(f"demo models: {name}/ is not a class-conditional bov model over the "
                             f"tokenizer's {tok.codebook_size} codes")
    return DemoModels(tok, nbp, ntp, root, nbp_long)


def heldout_clips(num_clips: int, seed: int = EVAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out clips: (video float32 [N, 3, 17, 16, 16] in [0, 1], labels int64 [N])."""
    if seed == TRAIN_SEED:
        raise ValueError(f"seed: {seed} is the training seed; held-out clips need another one")
    ds = SyntheticVideos(num_clips, seed=seed, **DATA_OPTIONS)
    items = [ds[i] for i in range(num_clips)]
    return (torch.stack([it["video"] for it in items]),
            torch.tensor([it["label"] for it in items], dtype=torch.int64))


def condition_ids(model: NBPTransformer, class_ids) -> torch.Tensor:
    """Model ids int64 [B, 1 + L] = [class, bov x L] that start a demo sequence
    (``nbp.layout.video_prompt``); class_ids: int [B] in [0, 12) (``nbp.data.synthetic.CLASS_NAMES``)."""
    cfg = model.config
    return layout.video_prompt(cfg, layout.condition_ids(cfg, class_ids)).ids


def decode_tokens(gen: FastGenerator, tokens: torch.Tensor) -> torch.Tensor:
    """Model ids of the whole grid [B, t*h*w] (block order) -> video float32 [B, 3, T, H, W]
    (``FastGenerator.decode_ids``)."""
    return gen.decode_ids(tokens)


@torch.no_grad()
def prediction_prompt(gen: FastGenerator, video: torch.Tensor, class_ids, *,
                      num_cond_frames: int = NUM_COND_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode the given frames: (prompt ids int64 [B, 1 + L + n], their codes' ids int64 [B, n]).

    video: float [B, 3, T, H, W] in [0, 1] (only the first ``num_cond_frames`` are read);
    class_ids: int [B]. The prompt is ``[class, bov x L, codes]`` (``FastGenerator.frame_prompt``).
    """
    prompt = gen.frame_prompt(video, num_cond_frames, class_ids=class_ids)
    return prompt.ids, prompt.given


def predict_frames(gen: FastGenerator, video: torch.Tensor, class_ids, *,
                   num_cond_frames: int = NUM_COND_FRAMES, mode: str = "nbp",
                   **sampling) -> torch.Tensor:
    """Frame prediction with a demo generator (``FastGenerator.predict_frames``, greedy by default).

    video: float [B, 3, T, H, W] in [0, 1] (only the first ``num_cond_frames`` are
    read); class_ids: int [B]. mode: "nbp" (blocks of L) or "ntp" (for the NTP
    model). ``sampling``: keyword arguments of ``FastGenerator.generate_tokens``.
    Returns the decoded video float32 [B, 3, 17, 16, 16]: the tokenizer's
    reconstruction of the given frames, then the predicted ones.
    """
    sampling.setdefault("do_sample", False)
    return gen.predict_frames(video, num_cond_frames, class_ids=class_ids, mode=mode, **sampling)


def generate_class(gen: FastGenerator, class_ids, *, mode: str = "nbp", **sampling) -> torch.Tensor:
    """Class-conditional generation: class_ids int [B] -> video float32 [B, 3, 17, 16, 16].

    ``sampling``: keyword arguments of ``FastGenerator.generate_tokens`` (default:
    sampling with ``SAMPLING``, i.e. top-k 5).
    """
    return gen.generate_video(class_ids, mode=mode, **{**SAMPLING, **sampling})
