"""Helpers of the GPU table scripts in ``benchmarks/`` (not used by ``nbp bench``)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from nbp.commands.bench import median, time_interleaved
from nbp.io import atomic_write_text


def gpu_table_device(script: str, tiny: bool) -> torch.device:
    """The device of a GPU table script: CUDA when present; the CPU only for a --tiny smoke run."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not tiny:
        raise SystemExit(f"{script} needs a CUDA device (use --tiny for a CPU smoke run)")
    return torch.device("cpu")


def write_table(out: Path, stem: str, device_name: str, result: dict, text: str) -> None:
    """Write a GPU table as ``out/<stem>_<device>.md`` (``text``) and ``.json`` (``result``), atomically."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}_{slug}.md", text)
    atomic_write_text(out / f"{stem}_{slug}.json", json.dumps(result, indent=1, default=str))


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 1 << 28,
                   repeats: int = 10) -> float:
    """Measured copy bandwidth of ``device`` in bytes/s: a copy of an ``nbytes``
    buffer reads and writes it (2 * nbytes moved); median of ``repeats`` copies,
    timed with CUDA events on CUDA (no host synchronisation in the interval)."""
    device = torch.device(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if device.type != "cuda":
        return 2 * nbytes / median(time_interleaved({"copy": lambda: dst.copy_(src)}, repeats)["copy"])
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeats)]
    for start, end in events:
        start.record()
        dst.copy_(src)
        end.record()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * nbytes / (1e-3 * median([s.elapsed_time(e) for s, e in events]))
