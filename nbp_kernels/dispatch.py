"""Backend selection: ``torch`` | ``triton`` | ``cuda`` | ``reference`` | ``auto``.

Every backend module exposes ``block_causal_attention``, ``block_decode_attention``,
``kv_append_`` (same signatures as ``reference.py``) and ``is_available(device)
-> (bool, reason)``. ``auto`` picks ``torch`` on CPU and, on CUDA, the entry of
the measured table ``tuning.json`` (written by ``benchmarks/gpu_check.sh``)
for the op, head_dim, L, dtype and device name, else ``triton``.
"""
from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

import torch

BACKENDS = {
    "torch": "nbp_kernels.torch_ops",
    "triton": "nbp_kernels.ops",
    "cuda": "nbp_kernels.cuda_ops",
    "reference": "nbp_kernels.reference",
}
TUNING_FILE = Path(__file__).with_name("tuning.json")


_LOADED: dict = {}


def _module(name: str):
    # Imported once, then a dict lookup that torch.compile can trace (it will
    # not trace importlib), so ops called inside a compiled decode step do not
    # break the graph.
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = importlib.import_module(BACKENDS[name])
    return mod


def backend_status(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(usable, reason) for backend ``name`` on ``device``."""
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(BACKENDS) + ['auto']}, got {name!r}")
    try:
        mod = _module(name)
    except Exception as e:  # an optional dependency or build is missing
        return False, f"cannot import {BACKENDS[name]}: {e}"
    check = getattr(mod, "is_available", None)
    return (True, "") if check is None else check(torch.device(device))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    return [n for n in BACKENDS if backend_status(n, device)[0]]


@functools.lru_cache(maxsize=1)
def _tuning_table() -> list[dict]:
    if not TUNING_FILE.exists():
        return []
    return json.loads(TUNING_FILE.read_text()).get("entries", [])


def _auto(op: str, device: torch.device, head_dim: int, block_len: int, dtype: torch.dtype) -> str:
    if device.type != "cuda":
        return "torch"
    name = torch.cuda.get_device_name(device)
    for e in _tuning_table():
        if (e["op"], e["head_dim"], e["block_len"], e["dtype"], e["device"]) == (
                op, head_dim, block_len, str(dtype).replace("torch.", ""), name):
            if backend_status(e["backend"], device)[0]:
                return e["backend"]
    return "triton" if backend_status("triton", device)[0] else "torch"


def resolve(backend: str, op: str, device: torch.device, head_dim: int, block_len: int,
            dtype: torch.dtype):
    """The backend module to run ``op`` with; raises a clear error if unusable."""
    if backend == "auto":
        backend = _auto(op, device, head_dim, block_len, dtype)
    ok, why = backend_status(backend, device)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not usable on {device}: {why}")
    return _module(backend)
