"""The command-line flags shared by the scripts in ``benchmarks/ablations``."""
from __future__ import annotations

import torch


def add_ablation_args(p) -> None:
    """The model, sampling and device flags shared by the scripts in benchmarks/ablations."""
    p.add_argument("--preset", default="k600-base")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top-k", type=int, default=16000)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
