"""The command-line flags and the result writer shared by the scripts in ``benchmarks/ablations``."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nbp.io import atomic_write_text


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


def add_cpu_run_args(p, results: Path, repeats: int = 21) -> None:
    """--threads, --repeats, --out and --tag of a CPU ablation that writes one result file
    into ``results`` (its name tagged)."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--out", type=Path, default=results)
    p.add_argument("--tag", default="", help="appended to the result file's name")


def write_result(path: Path, result: dict) -> Path:
    """Write an ablation's result JSON atomically (creating its folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
