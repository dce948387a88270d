"""``nbp eval``: reconstruction and frame-prediction quality, and speed, of the demo models.

``nbp eval --model demo --json`` (or ``--model DIR`` with ``tokenizer/``, ``nbp/`` and
``ntp/`` native dirs) renders held-out synthetic clips (``nbp.demo.EVAL_SEED``, a seed
never used in training) and reports:

* ``recon_psnr`` / ``recon_ssim``: tokenizer encode -> decode of the whole clip;
* ``pred_psnr_nbp`` / ``pred_psnr_ntp`` (+ ``_ssim_``): K600-protocol frame prediction,
  5 given frames and 12 predicted (greedy), compared with the true continuation;
  the generators also read the clip's class label (the demo models are class-conditional);
* ``pred_psnr_copy_last`` (+ SSIM): the baseline that repeats the last given frame;
* ``fps_nbp`` / ``fps_ntp``: predicted frames per second of wall time, end to end
  (encode the given frames, generate, decode; batch of all clips, best of
  ``--repeats`` after one warm-up run); ``token_fps_*``: the same counting only token
  generation (the part NBP speeds up; the paper's speed figures);
* ``fps1_*`` / ``token_fps1_*`` and ``speedup1_*``: the same for one video at a time
  (the first clip): the latency a user waits for, where a step is small and NBP's
  fewer steps count most;
* with ``--i3d PATH``: ``fvd_nbp`` / ``fvd_ntp`` (StyleGAN-V protocol, ``nbp.metrics.fvd``);
* ``pred_psnr_nbp_<w>`` / ``token_agreement_nbp_<w>`` for each weight dtype w (float32,
  bfloat16, int8; ``FastGenerator(weight_dtype=...)``), and for ``int8_a16`` / ``int8_a8``,
  int8 weights with int16 / int8 activations (``act_dtype=...``), and ``bfloat16_abf16``,
  bfloat16 weights and activations: greedy NBP frame prediction with
  the linears' weights stored at w, and the fraction of its predicted tokens equal to
  float32's (``weight_dtype_rows``); ``pred_psnr_drop_nbp_<w>``: float32's PSNR minus w's.

``nbp eval --frames N`` (N = 1 + 2k beyond the trained 17) instead evaluates long videos
(``nbp.long_video``) with ``nbp_long`` when the model dir has it, else ``nbp``
(``--long-model``; the JSON's ``long_model`` says which): held-out clips rendered at N
frames, NBP predicting N - 5 frames from 5 with the rolling latent window (greedy;
``--window``, default the model's), as is and with each window's context re-encoded
(``reencode``). It reports ``long_psnr_nbp`` /
``long_psnr_nbp_reencode`` against ``long_psnr_copy_last``, their margins, the PSNR of the
last 16 frames, and a no-collapse check on the last 16 frames: their mean per-frame
spatial standard deviation (``long_last16_std_*``) against the true clips' (a video
collapsed to a flat image has none; ``long_no_collapse_*`` asks for at least half).

PSNR and SSIM follow ``nbp.metrics`` (per frame, then averaged).
"""
from __future__ import annotations

import json
import time

import torch

from .cpu_options import (
    WEIGHT_DTYPES,
    act_dtype,
    add_threads,
    add_tokenizer_dtype,
    apply_threads,
    weight_dtype,
)

NUM_PRED_FRAMES = 12
# weight_dtype_rows: (row name, --weight-dtype, --act-dtype)
WEIGHT_ROWS = tuple((w, w, "float32") for w in WEIGHT_DTYPES) + (
    ("int8_a16", "int8", "int16"), ("int8_a8", "int8", "int8"),
    ("bfloat16_abf16", "bfloat16", "bfloat16"))


def _timed_prediction(gen, video, labels, mode: str, repeats: int) -> tuple[torch.Tensor, float, float]:
    """Greedy frame prediction, timed after one warm-up run (best of ``repeats``).

    Returns (video float32 [B, 3, 17, H, W], seconds end to end (encode the given
    frames, generate, decode), seconds of token generation alone).
    """
    from nbp.demo import decode_tokens, prediction_prompt

    out, total, tokens_only = None, float("inf"), float("inf")
    for _ in range(repeats + 1):   # the first run warms up allocations and caches
        t0 = time.perf_counter()
        prompt, prefix = prediction_prompt(gen, video, labels)
        t1 = time.perf_counter()
        new = gen.generate_tokens(prompt, gen.config.video_len - prefix.shape[1],
                                  cond_len=gen.config.cond_len, mode=mode, do_sample=False)
        t2 = time.perf_counter()
        out = decode_tokens(gen, torch.cat([prefix, new], dim=1))
        total = min(total, time.perf_counter() - t0)
        tokens_only = min(tokens_only, t2 - t1)
    return out, total, tokens_only


def pred_tokens_given(cfg, tok) -> int:
    """Tokens of the given frames: latent frames of NUM_COND_FRAMES frames times h * w."""
    from nbp.demo import NUM_COND_FRAMES

    return (1 + (NUM_COND_FRAMES - 1) // tok.config.factors[0]) * cfg.latent_shape[1] * cfg.latent_shape[2]


def evaluate(models, num_clips: int = 64, seed: int | None = None, threads: int | None = None,
             repeats: int = 1, i3d: str | None = None) -> dict:
    """Metrics dict of ``models`` (a ``nbp.demo.DemoModels``) on ``num_clips`` held-out clips.

    i3d: path of the StyleGAN-V ``i3d_torchscript.pt``; when given, ``fvd_nbp`` / ``fvd_ntp``
    compare the predicted 17-frame videos with the true clips (``nbp.metrics.fvd``).
    """
    from nbp import metrics
    from nbp.demo import EVAL_SEED, NUM_COND_FRAMES, heldout_clips
    from nbp.generate import FastGenerator

    if int(num_clips) < 1:
        raise ValueError(f"--num-clips: expected a positive int, got {num_clips!r}")
    apply_threads(threads)
    detector = metrics.load_i3d(i3d) if i3d else None
    seed = EVAL_SEED if seed is None else seed
    video, labels = heldout_clips(num_clips, seed)
    tok = models.tokenizer
    recon = tok.decode(tok.encode(video))
    truth = video[:, :, NUM_COND_FRAMES:NUM_COND_FRAMES + NUM_PRED_FRAMES]
    copy_last = video[:, :, NUM_COND_FRAMES - 1:NUM_COND_FRAMES].expand_as(truth)
    res = {"num_clips": num_clips, "seed": seed, "given_frames": NUM_COND_FRAMES,
           "predicted_frames": NUM_PRED_FRAMES,
           "recon_psnr": metrics.psnr(recon, video), "recon_ssim": metrics.ssim(recon, video)}
    for name in ("nbp", "ntp"):
        gen = FastGenerator(models.model(name), tok, device="cpu")
        pred, seconds, gen_seconds = _timed_prediction(gen, video, labels, name, repeats)
        if detector is not None:
            res[f"fvd_{name}"] = metrics.fvd(pred, video, detector)
        pred = pred[:, :, NUM_COND_FRAMES:NUM_COND_FRAMES + NUM_PRED_FRAMES]
        res[f"pred_psnr_{name}"] = metrics.psnr(pred, truth)
        res[f"pred_ssim_{name}"] = metrics.ssim(pred, truth)
        res[f"fps_{name}"] = num_clips * NUM_PRED_FRAMES / seconds
        res[f"token_fps_{name}"] = num_clips * NUM_PRED_FRAMES / gen_seconds
        _, seconds, gen_seconds = _timed_prediction(gen, video[:1], labels[:1], name, repeats)
        res[f"fps1_{name}"] = NUM_PRED_FRAMES / seconds
        res[f"token_fps1_{name}"] = NUM_PRED_FRAMES / gen_seconds
        cfg = models.model(name).config
        res[f"steps_{name}"] = (cfg.video_len - pred_tokens_given(cfg, tok)) // cfg.block_size
    res["pred_psnr_copy_last"] = metrics.psnr(copy_last, truth)
    res["pred_ssim_copy_last"] = metrics.ssim(copy_last, truth)
    res["speedup_nbp_over_ntp"] = res["fps_nbp"] / res["fps_ntp"]
    res["token_speedup_nbp_over_ntp"] = res["token_fps_nbp"] / res["token_fps_ntp"]
    res["speedup1_nbp_over_ntp"] = res["fps1_nbp"] / res["fps1_ntp"]
    res["token_speedup1_nbp_over_ntp"] = res["token_fps1_nbp"] / res["token_fps1_ntp"]
    res.update(weight_dtype_rows(models, video, labels, truth))
    res["threads"] = torch.get_num_threads()
    return res


LAST = 16   # frames of the no-collapse check


def _spatial_std(video: torch.Tensor) -> float:
    """Mean over samples, channels and frames of each frame's spatial std; video float
    [B, C, T, H, W]."""
    return float(video.float().std(dim=(-2, -1)).mean())


def evaluate_long(models, num_frames: int, num_clips: int = 64, seed: int | None = None,
                  threads: int | None = None, window: int | None = None,
                  which: str | None = None) -> dict:
    """Long-video metrics (module docstring) of ``models`` on ``num_clips`` held-out clips
    rendered at ``num_frames`` frames; which: the generator ("nbp" or "nbp_long"; default
    ``models.long_model()``: nbp_long when there is one), reported as ``long_model``."""
    from nbp import metrics
    from nbp.data.synthetic import render_clip
    from nbp.demo import DATA_OPTIONS, EVAL_SEED, NUM_COND_FRAMES
    from nbp.generate import FastGenerator
    from nbp.long_video import check_window, latent_frames, predict_frames

    if int(num_clips) < 1:
        raise ValueError(f"--num-clips: expected a positive int, got {num_clips!r}")
    if which is None:
        which = models.long_model()[0]
    if which not in ("nbp", "nbp_long"):
        raise ValueError(f"--long-model: expected 'nbp' or 'nbp_long', got {which!r}")
    gen = FastGenerator(models.model(which), models.tokenizer, device="cpu")
    latent_frames(num_frames, models.tokenizer.config.factors[0])
    window = check_window(gen.config, window)
    if num_frames < NUM_COND_FRAMES + LAST:
        raise ValueError(f"--frames: expected at least {NUM_COND_FRAMES + LAST} frames (5 given, "
                         f"{LAST} checked for collapse), got {num_frames}")
    apply_threads(threads)
    seed = EVAL_SEED if seed is None else seed
    clips = [render_clip(seed, i, **{**DATA_OPTIONS, "num_frames": num_frames})
             for i in range(num_clips)]
    video = torch.stack([torch.from_numpy(c[0]) for c in clips])
    labels = torch.tensor([c[1] for c in clips])
    truth = video[:, :, NUM_COND_FRAMES:]
    copy_last = video[:, :, NUM_COND_FRAMES - 1:NUM_COND_FRAMES].expand_as(truth)
    res = {"num_clips": num_clips, "seed": seed, "given_frames": NUM_COND_FRAMES,
           "long_frames": num_frames, "long_predicted_frames": num_frames - NUM_COND_FRAMES,
           "window": window, "long_model": which, "long_psnr_copy_last": metrics.psnr(copy_last, truth),
           "long_last16_psnr_copy_last": metrics.psnr(copy_last[:, :, -LAST:], truth[:, :, -LAST:]),
           "long_last16_std_truth": _spatial_std(truth[:, :, -LAST:])}
    for name, reencode in (("nbp", False), ("nbp_reencode", True)):
        t0 = time.perf_counter()
        pred = predict_frames(gen, video, NUM_COND_FRAMES, num_frames=num_frames, window=window,
                              class_ids=labels, reencode=reencode, do_sample=False)
        seconds = time.perf_counter() - t0
        pred = pred[:, :, NUM_COND_FRAMES:]
        res[f"long_psnr_{name}"] = metrics.psnr(pred, truth)
        res[f"long_margin_{name}"] = res[f"long_psnr_{name}"] - res["long_psnr_copy_last"]
        res[f"long_last16_psnr_{name}"] = metrics.psnr(pred[:, :, -LAST:], truth[:, :, -LAST:])
        res[f"long_last16_std_{name}"] = _spatial_std(pred[:, :, -LAST:])
        res[f"long_no_collapse_{name}"] = (res[f"long_last16_std_{name}"]
                                           >= 0.5 * res["long_last16_std_truth"])
        res[f"long_fps_{name}"] = num_clips * truth.shape[2] / seconds
    res["threads"] = torch.get_num_threads()
    return res


@torch.no_grad()
def weight_dtype_rows(models, video: torch.Tensor, labels: torch.Tensor,
                      truth: torch.Tensor) -> dict:
    """Greedy NBP frame prediction per weight dtype (``WEIGHT_ROWS``: each of
    ``WEIGHT_DTYPES``, and int8 weights with int16 or int8 activations): PSNR against ``truth``
    (float32 [B, 3, 12, H, W]) and the fraction of predicted tokens equal to those of
    float32 weights. video float32 [B, 3, T, H, W], labels int [B]. Narrow weights need the
    packed CPU linear (integer activations the int8 one); rows that cannot run are left out,
    with the reason in ``weight_dtypes``."""
    from nbp import metrics
    from nbp.demo import NUM_COND_FRAMES, decode_tokens, prediction_prompt
    from nbp.generate import FastGenerator
    from nbp_kernels import int8_linear, packed_linear

    ok, why = packed_linear.is_available()
    ok8, why8 = int8_linear.is_available()
    rows = [r for r in WEIGHT_ROWS
            if r[1] == "float32" or (ok and (r[2] in ("float32", "bfloat16") or ok8))]
    res, ref = {}, None
    for name, w, a in rows:
        gen = FastGenerator(models.model("nbp"), models.tokenizer, device="cpu",
                            weight_dtype=weight_dtype(w), act_dtype=act_dtype(a))
        prompt, prefix = prediction_prompt(gen, video, labels)
        new = gen.generate_tokens(prompt, gen.config.video_len - prefix.shape[1],
                                  cond_len=gen.config.cond_len, mode="nbp", do_sample=False)
        ref = new if ref is None else ref
        pred = decode_tokens(gen, torch.cat([prefix, new], dim=1))
        pred = pred[:, :, NUM_COND_FRAMES:NUM_COND_FRAMES + NUM_PRED_FRAMES]
        res[f"pred_psnr_nbp_{name}"] = metrics.psnr(pred, truth)
        res[f"token_agreement_nbp_{name}"] = (new == ref).double().mean().item()
        res[f"pred_psnr_drop_nbp_{name}"] = res["pred_psnr_nbp_float32"] - res[f"pred_psnr_nbp_{name}"]
    if not ok:
        res["weight_dtypes"] = f"float32 only: the packed CPU linear is not usable ({why})"
    elif not ok8:
        res["weight_dtypes"] = (f"no int8_a16 / int8_a8: the int8 CPU linear is not usable "
                                f"({why8})")
    return res


def run(args) -> int:
    from nbp.demo import load_demo
    from nbp.devices import tokenizer_dtype

    if args.long_model is not None and args.frames is None:
        raise ValueError("--long-model: applies to long videos; pass --frames N too")
    tok_dtype, _ = tokenizer_dtype(args.tokenizer_dtype, "cpu")
    models = load_demo(None if args.model == "demo" else args.model)
    models.tokenizer.to(dtype=tok_dtype)
    if args.frames is not None and args.frames != 1 + models.tokenizer.config.factors[0] * (
            models.nbp.config.latent_shape[0] - 1):
        res = evaluate_long(models, args.frames, args.num_clips, args.seed, args.threads,
                            args.window, args.long_model)
    else:
        res = evaluate(models, args.num_clips, args.seed, args.threads, args.repeats, args.i3d)
    res["model"] = str(models.path)
    res["tokenizer_dtype"] = str(tok_dtype)[6:]
    if args.json:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}))
    else:
        for k, v in res.items():
            print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="quality and speed of the demo models on held-out clips")
    p.add_argument("--model", default="demo",
                   help="'demo' (shipped) or a dir holding tokenizer/, nbp/ and ntp/ native dirs")
    p.add_argument("--num-clips", type=int, default=64,
                   help="held-out clips (default 64: the per-clip PSNR margin over copy-last "
                        "varies by ~2 dB, so 16 clips leave +-0.5 dB of noise)")
    p.add_argument("--seed", type=int, default=None, help="held-out clip seed (default nbp.demo.EVAL_SEED)")
    add_threads(p, default=1, why=": the demo's decode steps are so small that thread "
                                 "hand-offs cost more than they save, badly so on a busy machine")
    p.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (best is kept)")
    add_tokenizer_dtype(p, default="float32")
    p.add_argument("--i3d", default=None, help="StyleGAN-V i3d_torchscript.pt: also report FVD")
    p.add_argument("--frames", type=int, default=None,
                   help="evaluate long videos instead: clips of this many frames (1 + 2k, e.g. "
                        "65), predicted from 5 with the rolling latent window (nbp.long_video)")
    p.add_argument("--window", type=int, default=None,
                   help="with --frames: latent frames of context per window (default: the "
                        "trained length minus one block-row)")
    p.add_argument("--long-model", choices=("nbp", "nbp_long"), default=None,
                   help="with --frames: the generator (default: nbp_long, the NBP model "
                        "fine-tuned on windows of long clips, when the model dir has it; else nbp)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="as in nbp generate: allow unpickling files that can run code. eval reads "
                        "only native dirs (safetensors) and a TorchScript I3D, which are never "
                        "unpickled as Python objects, so this changes nothing today")
    p.set_defaults(func=run)
