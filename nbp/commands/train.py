"""``nbp train tokenizer | tokens | transformer``: the trainers from the command line.

* ``nbp train tokenizer --out DIR --data synthetic --resolution 32 ...`` trains a
  VideoTokenizer (reconstruction loss) and exports ``DIR/model``.
* ``nbp train tokens --tokenizer DIR/model --out codes.safetensors --data ...``
  encodes a dataset once and caches the codes.
* ``nbp train transformer --out DIR --tokens codes.safetensors --block-shape 1 1 8 ...``
  trains an NBP (any block shape), NTP (``--block-shape 1 1 1``) or hybrid
  generator on cached codes and exports ``DIR/model``.

Every command runs unchanged under ``torchrun --nproc_per_node N -m nbp.cli train ...``
(DDP; ``--fsdp`` for FSDP2); ``--resume`` continues ``DIR/checkpoint.pt`` exactly.
Ctrl-C checkpoints the step in progress and ends with one line (exit code 130).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from ..data.synthetic import BACKGROUNDS
from .cpu_options import add_threads, apply_threads

__all__ = ["register", "build_dataset", "transformer_config"]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="'synthetic' (procedural sprites) or a video folder root "
                        "(UCF-101 / K600 layout)")
    g.add_argument("--annotations", help="annotation list (path<TAB>label per line) for a video folder")
    g.add_argument("--split", default="train", help="sub-folder scanned when there is no list")
    g.add_argument("--resolution", type=int, default=32)
    g.add_argument("--num-frames", type=int, default=17)
    g.add_argument("--num-clips", type=int, help="synthetic: number of clips (default 10000)")
    g.add_argument("--clips-per-video", type=int,
                   help="video folder: clips taken from each video, evenly over its length "
                        "(default 1)")
    g.add_argument("--data-seed", type=int, default=0, help="synthetic: clip seed")
    g.add_argument("--sprites", type=int, nargs=2, default=(1, 1), metavar=("MIN", "MAX"),
                   help="synthetic: sprites per clip")
    g.add_argument("--background", default="smooth", choices=BACKGROUNDS,
                   help="synthetic: continuous random backgrounds or a small discrete palette")
    g.add_argument("--fps", type=float, help="video folder: sample frames at this rate")
    g.add_argument("--frame-stride", type=int, default=1, help="video folder: take every k-th frame")
    g.add_argument("--sampling", default="center", choices=["center", "start", "random"])


def build_dataset(args):
    """The dataset the data flags describe."""
    from ..data import SyntheticVideos, VideoFolder

    if args.data == "synthetic":
        if args.clips_per_video is not None:
            raise ValueError("--clips-per-video: applies to a video folder; synthetic data takes "
                             "--num-clips")
        return SyntheticVideos(10000 if args.num_clips is None else args.num_clips,
                               resolution=args.resolution, num_frames=args.num_frames,
                               seed=args.data_seed, num_sprites=tuple(args.sprites),
                               background=args.background)
    if args.num_clips is not None:
        raise ValueError("--num-clips: applies to --data synthetic; a video folder gives "
                         "(its videos) x --clips-per-video clips")
    return VideoFolder(args.data, args.annotations, split=args.split, resolution=args.resolution,
                       num_frames=args.num_frames, fps=args.fps, frame_stride=args.frame_stride,
                       sampling=args.sampling, clips_per_video=args.clips_per_video or 1)


def _add_loop_args(p: argparse.ArgumentParser, lr: float) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--out", required=True, help="output dir: checkpoint.pt, log.jsonl, model/")
    g.add_argument("--steps", type=int, default=1000)
    g.add_argument("--batch", type=int, default=8, help="global batch (all processes)")
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--min-lr-ratio", type=float, default=0.0)
    g.add_argument("--warmup", type=int, default=0, help="warmup steps")
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--ckpt-every", type=int, default=500)
    g.add_argument("--stop-at", type=int, help="stop (checkpointed) at this step; resume later")
    g.add_argument("--resume", nargs="?", const="out_dir", metavar="CHECKPOINT",
                   help="continue OUT/checkpoint.pt (or the given checkpoint); refused when "
                        "there is nothing to continue or it was written with other settings")
    g.add_argument("--device", help="cpu | cuda (default: cuda when available)")
    g.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP under torchrun")
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    add_threads(g)
    g.add_argument("--no-progress", action="store_true")


def _loop(args):
    from ..train import LoopConfig, OptimConfig

    optim = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, betas=tuple(args.betas),
                        warmup_steps=args.warmup, schedule=args.schedule,
                        min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip or None)
    return LoopConfig(steps=args.steps, global_batch=args.batch, optim=optim, seed=args.seed,
                      log_every=args.log_every, ckpt_every=args.ckpt_every, stop_at=args.stop_at,
                      resume=args.resume, device=args.device, fsdp=args.fsdp, amp=not args.no_amp,
                      progress=not args.no_progress, threads=args.threads)


def _stop_cleanly(run):
    """Ctrl-C ends a command with one line and exit code 130, never a traceback."""

    @functools.wraps(run)
    def wrapped(args) -> int:
        # Imported when a training command runs, not when the CLI's parser is built:
        # the loop pulls in torch.distributed.checkpoint (~0.7 s on every command).
        from ..train.loop import Interrupted

        try:
            return run(args)
        except Interrupted as e:
            if e.is_main:
                print(f"stopped at step {e.step}, checkpoint at {e.checkpoint}, resume with the "
                      f"same command plus --resume", file=sys.stderr)
            return 130
        except KeyboardInterrupt:
            print(f"nbp train {args.what}: interrupted (the step in progress was not saved)",
                  file=sys.stderr)
            return 130
    return wrapped


@_stop_cleanly
def _run_tokenizer(args) -> int:
    from ..tokenizer import TokenizerConfig
    from ..train import TokenizerTrainConfig, train_tokenizer

    if args.config:
        mcfg = TokenizerConfig.from_dict(json.loads(Path(args.config).read_text()))
    else:
        mcfg = TokenizerConfig.from_preset(args.preset)
    over = {k: tuple(v) for k, v in (("encoder_channels", args.encoder_channels),
                                     ("decoder_channels", args.decoder_channels),
                                     ("fsq_levels", args.fsq_levels)) if v}
    if args.norm_groups:
        over["norm_groups"] = args.norm_groups
    mcfg = TokenizerConfig.from_dict({**mcfg.to_dict(), **over})
    cfg = TokenizerTrainConfig(model=mcfg, out_dir=args.out, loss=args.loss,
                               num_workers=args.workers, soft_steps=args.soft_steps, loop=_loop(args))
    train_tokenizer(cfg, build_dataset(args))
    return 0


@_stop_cleanly
def _run_tokens(args) -> int:
    import torch

    from ..data import extract_tokens
    from ..published import load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    apply_threads(args.threads)
    # float32 like every consumer of the codes (nbp.demo.load_demo casts its float16 demo
    # weights up): a float16 encoder can round a code differently
    tok = load_tokenizer(args.tokenizer, device=device, dtype=torch.float32)
    path = extract_tokens(tok, build_dataset(args), args.out, batch_size=args.batch, device=device,
                          progress=not args.no_progress)
    print(f"wrote {path}")
    return 0


def transformer_config(args, latent_shape, codebook_size):
    """TransformerConfig from a preset or JSON file plus the command-line overrides.

    The latent grid and codebook come from the token cache; the vocabulary and
    position table grow to what the layout needs unless given explicitly.
    """
    from ..config import TransformerConfig

    base = (json.loads(Path(args.config).read_text()) if args.config
            else TransformerConfig.from_preset(args.preset).to_dict())
    d = {**base, "latent_shape": list(latent_shape), "codebook_size": int(codebook_size)}
    for key in ("n_layer", "n_head", "n_embd", "dropout"):
        if getattr(args, key) is not None:
            d[key] = getattr(args, key)
    if args.block_shape:
        d["block_shape"] = list(args.block_shape)
    if args.classes is not None:
        d.update(cond_len=1 if args.classes else 0, cond_vocab_size=args.classes,
                 bov=bool(args.classes) or args.hybrid)
    if args.hybrid is not None:
        d["hybrid"] = args.hybrid
        d["bov"] = d["bov"] or args.hybrid
    probe = TransformerConfig.from_dict({**d, "vocab_size": 1 << 30, "max_seq_len": 1 << 30})
    need_len = _sequence_length(probe)
    d["vocab_size"] = args.vocab_size or probe.video_offset + probe.codebook_size
    d["max_seq_len"] = args.max_seq_len or max(need_len, 1)
    return TransformerConfig.from_dict(d)


def _sequence_length(cfg) -> int:
    """Length of the training input sequence of this layout."""
    import torch

    from ..train import build_sequences

    codes = torch.zeros(1, *cfg.latent_shape, dtype=torch.int64)
    cond = torch.zeros(1, cfg.cond_len, dtype=torch.int64) if cfg.cond_len else None
    return build_sequences(codes, cond, cfg)[0].shape[1]


@_stop_cleanly
def _run_transformer(args) -> int:
    from ..data import TokenDataset
    from ..train import TransformerTrainConfig, train_transformer

    tokens = TokenDataset(args.tokens)
    codebook = args.codebook_size or tokens.meta.get("codebook_size") or int(tokens.codes.max()) + 1
    latent = tokens.latent_shape
    if args.crop_frames is not None:
        if not 0 < args.crop_frames <= latent[0]:
            raise ValueError(f"--crop-frames: expected 1..{latent[0]} (the cache's latent "
                             f"frames), got {args.crop_frames}")
        latent = (args.crop_frames, *latent[1:])
    mcfg = transformer_config(args, latent, codebook)
    cfg = TransformerTrainConfig(model=mcfg, out_dir=args.out, tokens=args.tokens,
                                 p_drop_cond=args.p_drop_cond, backend=args.backend, loop=_loop(args),
                                 crop_frames=args.crop_frames, crop_start_prob=args.crop_start_prob,
                                 init=args.init)
    train_transformer(cfg, tokens)
    return 0


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a tokenizer or a transformer (torchrun for many GPUs)")
    kinds = p.add_subparsers(dest="what", required=True, metavar="WHAT")

    t = kinds.add_parser("tokenizer", help="train a VideoTokenizer on reconstruction")
    t.add_argument("--preset", default="tiny", help="TokenizerConfig preset (tiny, magvit2)")
    t.add_argument("--config", help="TokenizerConfig JSON file (instead of --preset)")
    t.add_argument("--encoder-channels", type=int, nargs="+")
    t.add_argument("--decoder-channels", type=int, nargs="+")
    t.add_argument("--fsq-levels", type=int, nargs="+")
    t.add_argument("--norm-groups", type=int)
    t.add_argument("--loss", default="mse", choices=["l1", "mse", "l1+mse"])
    t.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding clips")
    t.add_argument("--soft-steps", type=int, default=0,
                   help="first steps decode unrounded bounded latents (quantizer warmup)")
    _add_data_args(t)
    _add_loop_args(t, lr=1e-3)
    t.set_defaults(func=_run_tokenizer)

    k = kinds.add_parser("tokens", help="encode a dataset once and cache its codes (safetensors)")
    k.add_argument("--tokenizer", required=True, help="native tokenizer dir or magvit2_*.pt")
    k.add_argument("--out", required=True, help="cache file to write (.safetensors)")
    k.add_argument("--batch", type=int, default=8)
    k.add_argument("--device")
    add_threads(k)
    k.add_argument("--no-progress", action="store_true")
    _add_data_args(k)
    k.set_defaults(func=_run_tokens)

    m = kinds.add_parser("transformer", help="train an NBP / NTP / hybrid generator on cached codes")
    m.add_argument("--tokens", required=True, help="cache written by `nbp train tokens`")
    m.add_argument("--preset", default="tiny", help="TransformerConfig preset")
    m.add_argument("--config", help="TransformerConfig JSON file (instead of --preset)")
    m.add_argument("--n-layer", type=int)
    m.add_argument("--n-head", type=int)
    m.add_argument("--n-embd", type=int)
    m.add_argument("--dropout", type=float)
    m.add_argument("--block-shape", type=int, nargs=3, metavar=("T", "H", "W"),
                   help="NBP block (1 1 1 = NTP); must tile the latent grid")
    m.add_argument("--hybrid", type=_bool, help="hybrid layout (causal first block), true/false")
    m.add_argument("--classes", type=int, help="class-conditional with this many classes (0: none)")
    m.add_argument("--p-drop-cond", type=float, default=0.0, help="condition dropout for CFG")
    m.add_argument("--vocab-size", type=int)
    m.add_argument("--max-seq-len", type=int)
    m.add_argument("--codebook-size", type=int, help="default: from the token cache")
    m.add_argument("--backend", default="auto", help="attention backend (auto, torch, triton, ...)")
    m.add_argument("--crop-frames", type=int, metavar="T",
                   help="train on windows of T latent frames (the model's latent length) cut "
                        "from a cache of longer clips, e.g. 9 of 33 (65-frame clips)")
    m.add_argument("--crop-start-prob", type=float, default=0.25, metavar="P",
                   help="with --crop-frames: share of windows that start at the clip's start "
                        "(the others start mid-clip, uniformly)")
    m.add_argument("--init", metavar="DIR",
                   help="start from the weights of this native model dir (e.g. "
                        "nbp/assets/demo/nbp); its config must equal the one the flags give")
    _add_loop_args(m, lr=3e-4)
    m.set_defaults(func=_run_transformer)
