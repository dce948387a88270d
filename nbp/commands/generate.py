"""``nbp generate``: a video from a model with FastGenerator, written as GIF or MP4.

Without ``--model`` it runs the small NBP demo model shipped with the package
(``nbp.demo``; with ``--mode ntp`` its NTP twin; with ``--frames`` past 17 its
``nbp_long`` fine-tune when shipped); ``--random`` (or a package
without the demo assets) runs a seeded, randomly initialised tiny
class-conditional model instead.

``--input FILE`` continues the user's own clip (any file PyAV reads): the file
is probed before the model loads; ``--num-cond-frames`` frames from ``--start``
are read at the model's frame rate and resolution (short side scaled, centre
cropped, ``nbp.video.read_clip``) and the rest of the model's frames predicted.
Frame-prediction models (no condition, like K600) continue them directly;
class-conditional ones (the demo models) under ``--class-id`` or, without it,
the class under which the given frames are most likely
(``FastGenerator.most_likely_class``); models with several condition ids under
``--cond-ids``. Hybrid (UCF) models are refused. ``--predict`` continues
held-out synthetic clips with the demo model instead.

Frame rate (``--fps``): ``model`` (default) is the rate the model was trained
at (``DEMO_FPS`` for the demo models, ``hyper_parameters.args.fps`` of a
published checkpoint; unknown: the input's own rate), ``input`` the input's
own rate, or a number. The given frames are sampled at that rate and the
output plays at it, so motion keeps its real speed.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from . import long_generate
from .cpu_options import (
    act_dtype,
    add_act_dtype,
    add_threads,
    add_tokenizer_dtype,
    add_weight_dtype,
    apply_threads,
    weight_dtype,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The demo clips have no real-time rate; 8 fps is the rate their GIFs have always played at,
# and the rate at which --input footage is sampled for them.
DEMO_FPS = 8.0


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
    """(model, tokenizer, kind): kind "demo", "random" or "file"."""
    if args.model is None:
        if args.tokenizer is not None:
            raise ValueError("--tokenizer: pass --model too (the demo models have their own)")
        if not args.random:
            try:
                from nbp.demo import load_demo
                demo = load_demo()
            except (ImportError, OSError, ValueError) as e:
                print(f"nbp generate: the shipped demo model is unavailable ({e})")
            else:
                which = "ntp" if args.mode == "ntp" else "nbp"
                trained = demo.tokenizer.config.video_shape(*demo.nbp.config.latent_shape)[0]
                if which == "nbp" and args.frames is not None and args.frames > trained:
                    which = demo.long_model()[0]   # fine-tuned on windows of long clips
                print(f"nbp generate: no --model given: using the {which.upper()} demo model shipped "
                      "with nbp (trained on synthetic 16x16 sprite clips, nbp/assets/demo)")
                return demo.model(which), demo.tokenizer, "demo"
        print("nbp generate: using a randomly initialised tiny model and tokenizer "
              "(RANDOM WEIGHTS: the video is noise, not a trained sample)")
        return (*demo_models(args.seed), "random")
    if args.tokenizer is None:
        raise ValueError("--tokenizer: a generator checkpoint needs its video tokenizer "
                         "(native dir or magvit2_*.pt)")
    from nbp.published import load_tokenizer, load_transformer

    trust = args.trust_remote_code
    model = load_transformer(args.model, **({"preset": args.preset} if args.preset else {}),
                             trust_remote_code=trust)
    return model, load_tokenizer(args.tokenizer, trust_remote_code=trust), "file"


def _model_fps(model, kind: str) -> float | None:
    from nbp.published import training_fps

    return training_fps(model) if kind == "file" else DEMO_FPS


def _fps_value(value: str) -> str | float:
    """--fps: 'model', 'input' or a positive number (ValueError naming the flag)."""
    if value in ("model", "input"):
        return value
    try:
        fps = float(value)
    except ValueError:
        fps = math.nan
    if not 0 < fps < math.inf:
        raise ValueError(f"--fps: expected 'model', 'input' or a positive number, got {value!r}")
    return fps


def _sampling(args) -> dict:
    return dict(do_sample=not args.greedy, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p,
                cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule,
                generator=torch.Generator().manual_seed(args.seed))


def _check_ntp(cfg, mode: str, prompt_len: int, new: int) -> None:
    """One line naming --mode when NTP would run past the model's position table."""
    if mode == "ntp" and prompt_len + new - 1 > cfg.max_seq_len:
        if cfg.block_size == 1:
            raise ValueError(f"--mode ntp: the request reads {prompt_len + new - 1} positions, "
                             f"more than this model's position table ({cfg.max_seq_len})")
        raise ValueError(
            f"--mode ntp: this model was trained with blocks of L={cfg.block_size}, so its position "
            f"table ({cfg.max_seq_len}) ends {cfg.block_size - 1} positions before NTP's last input "
            f"({prompt_len + new - 1}); NTP needs a model trained with L=1 (the demo's: omit --model). "
            "Use --mode nbp")


def _input_task(cfg) -> str:
    """How the model continues a clip: "predict" (no condition), "class" (one class id) or
    "cond" (condition ids); hybrid models are refused."""
    if cfg.hybrid:
        raise ValueError("--input: this model (hybrid, UCF layout) generates whole videos from a "
                         "condition and cannot continue a clip; drop --input (use --cond-ids)")
    return "predict" if cfg.cond_len == 0 else "class" if cfg.cond_len == 1 else "cond"


def _cond_latents(gen, n: int) -> int:
    """Latent frames of ``n`` given frames; ValueError naming --num-cond-frames if unusable."""
    cfg, tok = gen.config, gen.tokenizer
    ft, t = tok.config.factors[0], cfg.latent_shape[0]
    frames = tok.config.video_shape(*cfg.latent_shape)[0]
    n_lat = 1 + (n - 1) // ft if n >= 1 else 0
    if n < 1 or (n - 1) % ft or n_lat >= t or n_lat % cfg.block_shape[0]:
        raise ValueError(f"--num-cond-frames: expected 1 + {ft}k frames, fewer than the model's "
                         f"{frames} (e.g. {1 + ft}), got {n}")
    return n_lat


def _rate(args, model_fps: float | None, input_fps: float | None) -> float:
    fps = _fps_value(args.fps)
    if isinstance(fps, float):
        return fps
    if fps == "input":
        if input_fps is None:
            raise ValueError("--fps input: needs --input")
        return input_fps
    if model_fps is None and input_fps is not None:
        print(f"nbp generate: the model's training frame rate is unknown: using the input's "
              f"{input_fps:g} fps (--fps N to choose)")
    return model_fps or input_fps or DEMO_FPS


def _read_input(args, gen, info, rate: float) -> torch.Tensor:
    """The clip [B, 3, T, H, W] (T: given frames, or all the model's with --side-by-side)."""
    from nbp.video import frames_available, read_clip

    cfg = gen.config
    frames, H, W = gen.tokenizer.config.video_shape(*cfg.latent_shape)
    n = args.num_cond_frames
    _continuation_task(args, gen)      # the model can take it: checked before decoding
    if args.start >= info.duration:
        raise ValueError(f"--start: {args.start:g} s is past the end of {args.input} "
                         f"({info.duration:.2f} s)")
    have = frames_available(info, args.start, rate)
    if have < n:
        raise ValueError(f"--input: {args.input} holds {have} frames at {rate:g} fps from --start "
                         f"{args.start:g} s; the model needs --num-cond-frames {n} given frames")
    count = min(have, args.frames or frames) if args.side_by_side else n
    clip = read_clip(args.input, start_seconds=args.start, num_frames=count, fps=rate, size=(H, W))
    return clip[None].expand(args.batch, -1, -1, -1, -1)


def _continuation_task(args, gen) -> str:
    """The ``_input_task`` once the flags fit the model (else ValueError naming the flag)."""
    cfg = gen.config
    task = _input_task(cfg)
    n_lat = _cond_latents(gen, args.num_cond_frames)
    t, h, w = cfg.latent_shape
    if task == "cond" and not args.cond_ids:
        raise ValueError(f"--cond-ids: this model continues a clip under {cfg.cond_len} condition "
                         "ids; pass --cond-ids a,b,...")
    prompt_len = cfg.cond_len + cfg.block_size * int(cfg.bov) + n_lat * h * w
    _check_ntp(cfg, args.mode or "nbp", prompt_len, (t - n_lat) * h * w)
    return task


def _continue_clip(args, gen, clip: torch.Tensor, sampling: dict) -> torch.Tensor:
    n, mode, B = args.num_cond_frames, args.mode or "nbp", clip.shape[0]
    task = _continuation_task(args, gen)
    given = clip[:, :, :n]
    cond = {}
    if task == "cond":
        cond["cond_ids"] = [_cond_ids(args.cond_ids, gen.config)] * B
    elif task == "class" and args.class_id is not None:
        cond["class_ids"] = [args.class_id] * B
    elif task == "class":
        cond["class_ids"] = gen.most_likely_class(given, n)
        print(f"nbp generate: class {cond['class_ids'][0].item()} picked as the most likely for "
              "the given frames (--class-id N to choose)")
    if args.frames is not None:
        return long_generate.run(args, gen, video=given, num_cond_frames=n, mode=mode,
                                 sampling=sampling, **cond)
    return gen.predict_frames(given, n, mode=mode, **cond, **sampling)


def _cond_ids(text: str, cfg) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        ids = []
    if len(ids) != cfg.cond_len or any(not 0 <= i < cfg.cond_vocab_size for i in ids):
        raise ValueError(f"--cond-ids: expected {cfg.cond_len} comma-separated ids in "
                         f"[0, {cfg.cond_vocab_size}), got {text!r}")
    return ids


def _generate(args, gen, sampling: dict) -> torch.Tensor:
    cfg = gen.config
    if not cfg.bov:
        raise ValueError("--model: a frame-prediction model (it continues given frames): "
                         "pass --input FILE")
    _check_ntp(cfg, args.mode or "nbp", cfg.cond_len + (1 if cfg.hybrid else cfg.block_size),
               cfg.video_len)
    class_ids = cond_ids = None
    if args.cond_ids:
        cond_ids = [_cond_ids(args.cond_ids, cfg)] * args.batch
    elif cfg.cond_len > 1:
        raise ValueError(f"--cond-ids: this model is conditioned on {cfg.cond_len} ids (the UCF "
                         f"models: LLaMA-2 text token ids); pass --cond-ids a,b,... ({cfg.cond_len} ids)")
    elif cfg.cond_len == 1:
        class_ids = [args.class_id if args.class_id is not None else 0] * args.batch
    if args.frames is not None:
        return long_generate.run(args, gen, class_ids=class_ids, cond_ids=cond_ids,
                                 batch_size=args.batch, mode=args.mode, sampling=sampling)
    return gen.generate_video(class_ids=class_ids, cond_ids=cond_ids, batch_size=args.batch,
                              mode=args.mode, **sampling)


def _check_args(args) -> None:
    if Path(args.out).suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"--out: expected a .gif or .mp4 file name, got {args.out!r}")
    _fps_value(args.fps)
    if args.scale < 1:
        raise ValueError(f"--scale: expected a positive int, got {args.scale}")
    if args.batch < 1:
        raise ValueError(f"--batch: expected a positive int, got {args.batch}")
    if not 0 <= args.start < math.inf:
        raise ValueError(f"--start: expected seconds >= 0, got {args.start}")
    if args.predict and (args.model is not None or args.random or args.input is not None):
        raise ValueError("--predict: continues held-out synthetic clips with the shipped demo "
                         "model; it takes no --model, --random or --input")
    given = args.input is not None or args.predict
    for flag, used in (("--side-by-side", args.side_by_side), ("--mark-given", args.mark_given),
                       ("--start", args.start != 0)):
        if used and not given:
            raise ValueError(f"{flag}: applies to given frames; pass --input FILE (or --predict)")
    long_generate.check_args(args)


def _compose(args, video: torch.Tensor, clip: torch.Tensor | None) -> torch.Tensor:
    """Scale, add the input beside each prediction and mark the given frames."""
    def big(v):
        return v.repeat_interleave(args.scale, -1).repeat_interleave(args.scale, -2)

    from nbp.video import mark_given, side_by_side

    panels = [big(video.float().cpu())]
    if args.side_by_side:
        panels.insert(0, big(clip.float().cpu()))
    if args.mark_given:
        panels = [mark_given(p, args.num_cond_frames) for p in panels]
    return side_by_side(*panels) if len(panels) > 1 else panels[0]


def run(args) -> int:
    from nbp.devices import checked_device, tokenizer_dtype
    from nbp.generate import FastGenerator
    from nbp.io import save_video

    _check_args(args)
    apply_threads(args.threads)
    info = None
    if args.input is not None:
        from nbp.video import probe
        info = probe(args.input)     # an unreadable file is refused before the model loads
    device = checked_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok_dtype, _ = tokenizer_dtype(args.tokenizer_dtype, device)
    model, tok, kind = _load(args)
    tok = tok.to(dtype=tok_dtype)
    gen = FastGenerator(model, tok, device=device, dtype=_DTYPES[args.dtype], backend=args.backend,
                        weight_dtype=weight_dtype(args.weight_dtype),
                        act_dtype=act_dtype(args.act_dtype))
    cfg = gen.config
    rate = _rate(args, _model_fps(model, kind), info.fps if info else None)
    steps = []
    sampling = dict(_sampling(args), callback=lambda s, t: steps.append(s))
    if kind == "demo" and args.top_k is None:
        from nbp.demo import SAMPLING
        sampling.update(SAMPLING)
    clip = None
    if args.input is not None:
        clip = _read_input(args, gen, info, rate)
    t0 = time.perf_counter()
    if args.predict:
        from nbp.demo import heldout_clips, predict_frames

        gen.check_batch_fits(args.batch, cfg=args.cfg_scale is not None)   # before rendering clips
        clip, labels = heldout_clips(args.batch)
        if args.frames is not None:
            video = long_generate.run(args, gen, video=clip, num_cond_frames=args.num_cond_frames,
                                      class_ids=labels, mode=args.mode or "nbp", sampling=sampling)
        else:
            video = predict_frames(gen, clip, labels, num_cond_frames=args.num_cond_frames,
                                   mode=args.mode or "nbp", **sampling)
    elif clip is not None:
        video = _continue_clip(args, gen, clip, sampling)
    else:
        video = _generate(args, gen, sampling)
    if args.stream:   # the frames are generated as the file is written
        long_generate.write_stream(args, video, rate)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if args.stream:
        print(f"nbp generate: {args.frames} frames streamed in {seconds:.2f} s -> {args.out}")
        return 0
    path = save_video(_compose(args, video, clip), args.out, fps=rate)
    B, _, T, H, W = video.shape
    how = (f"{len(steps)} steps, {cfg.video_len} tokens each" if args.frames is None else
           f"windows of {cfg.latent_shape[0]} latent frames")
    print(f"nbp generate: {B} video(s) of {T} frames {H}x{W} at {rate:g} fps in {seconds:.2f} s "
          f"({how}, L={cfg.block_size}, {device}, tokenizer in {str(tok_dtype)[6:]}) -> {path}")
    return 0


def _add_input_options(p) -> None:
    p.add_argument("--input", default=None, help="video file to continue (any format PyAV reads): "
                   "frame-prediction models, or the demo model")
    p.add_argument("--start", type=float, default=0.0,
                   help="with --input: seconds into the file where the given frames start (default 0)")
    p.add_argument("--num-cond-frames", type=int, default=5,
                   help="given frames with --input / --predict (default 5)")
    p.add_argument("--side-by-side", action="store_true",
                   help="with --input / --predict: the input (its real continuation) left of "
                        "each prediction")
    p.add_argument("--mark-given", action="store_true",
                   help="draw a thin red border on the given frames")
    p.add_argument("--predict", action="store_true", help="demo model: continue held-out "
                   "synthetic clips (frame prediction) instead of class-conditional generation")


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate a video (GIF/MP4) with FastGenerator, or "
                       "continue a video file (--input)")
    p.add_argument("--out", default="demo.gif", help="output .gif or .mp4 (default demo.gif)")
    p.add_argument("--model", default=None, help="generator: native dir or published .ckpt "
                   "(default: the trained demo model shipped with nbp; see --random)")
    p.add_argument("--random", action="store_true", help="without --model: a random tiny model "
                   "instead of the shipped demo model")
    p.add_argument("--tokenizer", default=None, help="tokenizer: native dir or magvit2_*.pt")
    p.add_argument("--preset", default=None, help="transformer preset for checkpoints without "
                   "their flags")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow checkpoints that need full unpickling (can run code from the file)")
    _add_input_options(p)
    long_generate.add_arguments(p)
    p.add_argument("--scale", type=int, default=1, help="enlarge the saved frames by this factor")
    p.add_argument("--class-id", type=int, default=None,
                   help="class of class-conditional models (default 0; with --input: the most "
                        "likely class for the given frames)")
    p.add_argument("--cond-ids", default=None, help="comma-separated condition ids (e.g. text tokens)")
    p.add_argument("--batch", type=int, default=1, help="videos to generate (tiled side by side)")
    p.add_argument("--mode", default=None, choices=["nbp", "ntp", "hybrid"],
                   help="default: hybrid for hybrid models, else nbp. ntp (one token per step) "
                        "needs a model trained with L=1: an NBP-trained model's position table "
                        "is L-1 positions too short for it (without --model: the demo's NTP model)")
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
    add_weight_dtype(p)
    add_act_dtype(p)
    add_tokenizer_dtype(p)
    add_threads(p)
    p.add_argument("--fps", default="model",
                   help="frame rate of the given frames and the output: 'model' (default: the "
                        f"model's training rate; demo {DEMO_FPS:g}), 'input' (the input's own) or "
                        "a number")
    p.set_defaults(func=run)
