"""``nbp generate``: a video from a model with FastGenerator, written as GIF or MP4.

Without ``--model`` it runs the small NBP demo model shipped with the package
(``nbp.demo``); ``--random`` (or a package without the demo assets) runs a
seeded, randomly initialised tiny class-conditional model instead. With
``--predict`` the demo model continues held-out synthetic clips (frame
prediction: ``--num-cond-frames`` given, the rest predicted). ``--scale``
enlarges the saved frames (the demo clips are 16x16).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def demo_models(seed: int):
    """A random tiny class-conditional hybrid transformer (10 classes) and tiny tokenizer."""
    from nbp.config import TransformerConfig
    from nbp.model import NBPTransformer
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer

    torch.manual_seed(seed)
    tok = VideoTokenizer(TokenizerConfig.from_preset("tiny"))
    cfg = TransformerConfig.from_preset("tiny-hybrid", cond_len=1, cond_vocab_size=10,
                                        codebook_size=tok.codebook_size,
                                        vocab_size=4 + 10 + tok.codebook_size)
    return NBPTransformer(cfg), tok


def _load(args):
    if args.model is None:
        if args.tokenizer is not None:
            raise ValueError("--tokenizer: pass --model too (the random demo model has its own)")
        if not args.random:
            try:
                from nbp.demo import load_demo
                demo = load_demo()
            except (ImportError, OSError, ValueError) as e:
                print(f"nbp generate: the shipped demo model is unavailable ({e})")
            else:
                print("nbp generate: no --model given: using the NBP demo model shipped with nbp "
                      "(trained on synthetic sprite clips, nbp/assets/demo)")
                return demo.model("nbp"), demo.tokenizer, True
        print("nbp generate: using a randomly initialised tiny model and tokenizer "
              "(RANDOM WEIGHTS: the video is noise, not a trained sample)")
        return (*demo_models(args.seed), False)
    if args.tokenizer is None:
        raise ValueError("--tokenizer: a generator checkpoint needs its video tokenizer "
                         "(native dir or magvit2_*.pt)")
    from nbp.loading import load_tokenizer, load_transformer

    model = load_transformer(args.model, **({"preset": args.preset} if args.preset else {}))
    return model, load_tokenizer(args.tokenizer), False


def _read_video(path: str) -> torch.Tensor:
    """A video file -> float [1, 3, T, H, W] in [0, 1]."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--input: no such file {path!r}")
    import imageio.v3 as iio

    frames = torch.from_numpy(iio.imread(path, index=None))   # [T, H, W, C] uint8
    if frames.dim() != 4 or frames.shape[-1] < 3:
        raise ValueError(f"--input: expected an RGB video, got array of shape {tuple(frames.shape)}")
    return frames[..., :3].permute(3, 0, 1, 2)[None].float() / 255


def _sampling(args) -> dict:
    return dict(do_sample=not args.greedy, temperature=args.temperature,
                top_k=args.top_k if args.top_k and args.top_k > 0 else None, top_p=args.top_p,
                cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                generator=torch.Generator().manual_seed(args.seed))


def run(args) -> int:
    from nbp.generate import FastGenerator
    from nbp.io import save_video

    if Path(args.out).suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"--out: expected a .gif or .mp4 file name, got {args.out!r}")
    if args.fps <= 0:
        raise ValueError(f"--fps: expected a positive number, got {args.fps}")
    if args.scale < 1:
        raise ValueError(f"--scale: expected a positive int, got {args.scale}")
    if args.predict and (args.model is not None or args.random or args.input is not None):
        raise ValueError("--predict: continues held-out synthetic clips with the shipped demo "
                         "model; it takes no --model, --random or --input")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok, is_demo = _load(args)
    gen = FastGenerator(model, tok, device=device, dtype=_DTYPES[args.dtype], backend=args.backend)
    cfg = gen.config
    steps = []
    sampling = dict(_sampling(args), callback=lambda s, t: steps.append(s))
    if is_demo and args.top_k is None:
        from nbp.demo import SAMPLING
        sampling.update(SAMPLING)
    t0 = time.perf_counter()
    if args.predict:
        from nbp.demo import heldout_clips, predict_frames

        clips, labels = heldout_clips(args.batch)
        video = predict_frames(gen, clips, labels, num_cond_frames=args.num_cond_frames,
                               mode=args.mode or "nbp", **sampling)
    elif args.input is not None:
        video = gen.predict_frames(_read_video(args.input), args.num_cond_frames,
                                   mode=args.mode or "nbp", **sampling)
    else:
        class_ids = args.class_id if cfg.cond_len == 1 else None
        cond_ids = None
        if args.cond_ids:
            cond_ids, class_ids = [[int(x) for x in args.cond_ids.split(",")]] * args.batch, None
        elif class_ids is not None:
            class_ids = [class_ids] * args.batch
        video = gen.generate_video(class_ids=class_ids, cond_ids=cond_ids, batch_size=args.batch,
                                   mode=args.mode, **sampling)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    big = video.repeat_interleave(args.scale, -1).repeat_interleave(args.scale, -2)
    path = save_video(big, args.out, fps=args.fps)
    B, _, T, H, W = video.shape
    print(f"nbp generate: {B} video(s) of {T} frames {H}x{W} in {seconds:.2f} s "
          f"({len(steps)} steps, {cfg.video_len} tokens each, L={cfg.block_size}, {device}) "
          f"-> {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a video (GIF/MP4) with FastGenerator")
    p.add_argument("--out", default="demo.gif", help="output .gif or .mp4 (default demo.gif)")
    p.add_argument("--model", default=None, help="generator: native dir or published .ckpt "
                   "(default: a random tiny demo model)")
    p.add_argument("--random", action="store_true", help="without --model: a random tiny model "
                   "instead of the shipped demo model")
    p.add_argument("--tokenizer", default=None, help="tokenizer: native dir or magvit2_*.pt")
    p.add_argument("--preset", default=None, help="transformer preset for checkpoints without "
                   "their flags")
    p.add_argument("--input", default=None, help="video file to continue (frame prediction models)")
    p.add_argument("--num-cond-frames", type=int, default=5,
                   help="given frames with --input / --predict")
    p.add_argument("--predict", action="store_true", help="demo model: continue held-out "
                   "synthetic clips (frame prediction) instead of class-conditional generation")
    p.add_argument("--scale", type=int, default=1, help="enlarge the saved frames by this factor")
    p.add_argument("--class-id", type=int, default=0, help="class of class-conditional models")
    p.add_argument("--cond-ids", default=None, help="comma-separated condition ids (e.g. text tokens)")
    p.add_argument("--batch", type=int, default=1, help="videos to generate (tiled side by side)")
    p.add_argument("--mode", default=None, choices=["nbp", "ntp", "hybrid"],
                   help="default: hybrid for hybrid models, else nbp")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None,
                   help="e.g. 16000 as published (demo model default: nbp.demo.SAMPLING)")
    p.add_argument("--top-p", type=float, default=None, help="e.g. 0.9 as published")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--cfg-schedule", default="constant", choices=["constant", "linear"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    p.add_argument("--backend", default="auto", help="kernel backend (auto, torch, triton, cuda)")
    p.add_argument("--fps", type=float, default=8.0)
    p.set_defaults(func=run)
