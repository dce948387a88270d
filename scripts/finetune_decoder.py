"""Fine-tune a tokenizer's decoder with its encoder (hence its codes) frozen.

Usage: python scripts/finetune_decoder.py TOK_DIR OUT_DIR --steps N [--batch 8 --lr 5e-4
       --resolution 16 --num-frames 17 --num-clips 10000 --data-seed 0 --background smooth
       --seed 0]

The codes of every clip stay exactly those of TOK_DIR, so generators trained on a
token cache written with TOK_DIR stay valid; only the reconstruction improves. The
loss is MSE on clips of ``nbp.data.synthetic`` (drawn as in ``nbp train``: batch of
step s from a generator seeded with (seed, s)); AdamW with a cosine schedule. Writes
OUT_DIR (native dir) and OUT_DIR.log.jsonl.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nbp.data import SyntheticVideos
from nbp.data.synthetic import BACKGROUNDS
from nbp.io import atomic_write_text
from nbp.tokenizer import VideoTokenizer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tokenizer")
    p.add_argument("out")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--num-clips", type=int, default=10000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--background", default="smooth", choices=BACKGROUNDS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    tok = VideoTokenizer.from_pretrained(args.tokenizer, dtype=torch.float32).train()
    for prm in tok.encoder_layers.parameters():
        prm.requires_grad_(False)
    params = [q for q in tok.decoder_layers.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    data = SyntheticVideos(args.num_clips, resolution=args.resolution, num_frames=args.num_frames,
                           seed=args.data_seed, background=args.background)
    log, t0 = [], time.time()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data), (args.batch,), generator=g).tolist()
        video = torch.stack([data[i]["video"] for i in idx])
        for group in opt.param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        with torch.no_grad():
            codes, _ = tok.quantize(tok.encode_latents(video))
        loss = F.mse_loss(tok.decode_latents(codes), video)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            rec = {"step": step + 1, "loss": loss.item(), "psnr": -10 * math.log10(loss.item()),
                   "seconds": time.time() - t0}
            log.append(rec)
            print(json.dumps(rec), flush=True)
    tok.eval().save_pretrained(args.out)
    atomic_write_text(Path(str(args.out) + ".log.jsonl"), "".join(json.dumps(r) + "\n" for r in log))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
