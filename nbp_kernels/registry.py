"""The one implementation registry of nbp_kernels: which backend runs which op.

A backend declares the ops it implements, next to its code, with
``register(op, backend, impl, available=..., supports=...)`` (``torch_ops``,
``ops/__init__``, ``cuda_ops``, ``reference``, ``cpu_ops``). A backend need
not implement every op: asking a backend for an op it lacks falls back, per
op, to what ``auto`` picks for that op.

``resolve(op, backend, device=, dtype=, head_dim=, block_size=)`` returns the
implementation callable, memoised on its arguments, so callers resolve once
(``FastGenerator``: once per request) and call the function directly; the
lookup inside a compiled step is a dict lookup, which ``torch.compile``
traces. Implementations do not validate their arguments: the public wrappers
in ``nbp_kernels/__init__.py`` do, once.

``auto``: on the CPU the ``cpu`` C kernels where they implement the op and
are usable, else ``torch``; on CUDA the entry of ``tuning.json`` for (op,
head_dim, block_size, dtype, GPU name) when that file exists (written by
``benchmarks/tune_decode.py``) and the entry is usable, else ``triton``, else
``torch``. ``reference`` is never picked by ``auto``.

``forced(op=backend, ...)`` makes ``auto`` resolve ``op`` to ``backend`` while
the context is open (e.g. ``forced(keep_threshold="torch", draw_kept="torch")``
runs the sampler's torch fallback on the CPU).

Op contracts (shapes in ``reference.py``):

* ``block_causal_attention(q, k, v, *, block_size, cond_len, hybrid, scale)``
* ``block_decode_attention(q, k_cache, v_cache, seq_lens, *, k_new, v_new, scale)``
* ``kv_append_(k_cache, v_cache, k_new, v_new, seq_lens)``
* ``linear(model) -> fn(module: nn.Linear, x) -> y``: prepares (e.g. packs)
  the model's linears once; ``fn`` computes ``module(x)``
* ``keep_threshold(logits, top_k, top_p, *, work=None) -> (tau [N, 1], row_max [N, 1])``
* ``draw_kept(logits, tau, row_max, u) -> int64 [N]``
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

__all__ = ["OPS", "BACKENDS", "register", "resolve", "resolved_backend", "status_table",
           "backend_status", "available_backends", "backends_for", "forced", "TUNING_FILE"]

OPS = ("block_causal_attention", "block_decode_attention", "kv_append_", "linear",
       "keep_threshold", "draw_kept")
# backend -> the modules whose import registers its implementations
_MODULES = {
    "torch": ("nbp_kernels.torch_ops",),
    "triton": ("nbp_kernels.ops",),
    "cuda": ("nbp_kernels.cuda_ops",),
    "reference": ("nbp_kernels.reference",),
    "cpu": ("nbp_kernels.cpu_ops",),
}
BACKENDS = tuple(_MODULES)
_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}
TUNING_FILE = Path(__file__).with_name("tuning.json")

Status = tuple[bool, str]


@dataclass(frozen=True)
class _Key:
    """What an implementation may depend on besides the backend."""
    device: torch.device
    dtype: torch.dtype | None
    head_dim: int | None
    block_size: int | None


@dataclass
class _Impl:
    impl: Callable | str
    available: Callable[[torch.device], Status] | None
    supports: Callable[[_Key], Status] | None

    def function(self, op: str) -> Callable:
        if isinstance(self.impl, str):   # a module path, imported at first use
            self.impl = getattr(importlib.import_module(self.impl), op)
        return self.impl


_REGISTRY: dict[str, dict[str, _Impl]] = {op: {} for op in OPS}
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED: set[str] = set()
_FORCED: dict[str, str] = {}
_CACHE: dict[tuple, Callable] = {}


def _check_op(op) -> None:
    if op not in OPS:
        raise ValueError(f"op: expected one of {list(OPS)}, got {op!r}")


def _check_backend(backend, allow_auto: bool = True) -> None:
    names = list(BACKENDS) + (["auto"] if allow_auto else [])
    if backend not in names:
        raise ValueError(f"backend: expected one of {names}, got {backend!r}")


def register(op: str | tuple[str, ...], backend: str, impl: Callable | str, *,
             available: Callable[[torch.device], Status] | None = None,
             supports: Callable[[_Key], Status] | None = None) -> None:
    """Declare that ``backend`` implements ``op`` (or each op of a tuple) with ``impl``.

    impl: the function, or the dotted path of a module with a function named
    like each op (imported at first resolve). available(device) -> (usable,
    why not): the backend's runtime check (a build, a driver). supports(key)
    -> (ok, why not): limits of this implementation on (device, dtype,
    head_dim, block_size), checked at resolve time.
    """
    _check_backend(backend, allow_auto=False)
    for name in (op,) if isinstance(op, str) else op:
        _check_op(name)
        _REGISTRY[name][backend] = _Impl(impl, available, supports)
    _CACHE.clear()


def _load(backend: str) -> None:
    if backend in _LOADED:
        return
    _LOADED.add(backend)
    for mod in _MODULES[backend]:
        try:
            importlib.import_module(mod)
        except Exception as e:  # an optional dependency or build is missing
            _IMPORT_ERRORS[backend] = f"cannot import {mod}: {e}"


def backend_status(backend: str, device: torch.device | str = "cpu") -> Status:
    """(usable, why not) of ``backend`` on ``device``: usable if any of its ops' runtime
    checks passes (``status_table`` gives the answer per op and shape)."""
    _check_backend(backend, allow_auto=False)
    _load(backend)
    if backend in _IMPORT_ERRORS:
        return False, _IMPORT_ERRORS[backend]
    device = torch.device(device)
    reasons = []
    for entry in {id(e.available): e for impls in _REGISTRY.values()
                  if (e := impls.get(backend)) is not None}.values():
        ok, why = (True, "") if entry.available is None else entry.available(device)
        if ok:
            return True, ""
        reasons.append(why)
    return False, "; ".join(reasons) or "registers no ops"


def backends_for(op: str) -> list[str]:
    """The backends that register an implementation of ``op`` (usable or not)."""
    _check_op(op)
    for backend in BACKENDS:
        _load(backend)
    return [b for b in BACKENDS if b in _REGISTRY[op]]


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends usable on ``device``."""
    return [b for b in BACKENDS if backend_status(b, device)[0]]


def _status(op: str, backend: str, key: _Key) -> Status:
    """(usable, why not) of ``backend``'s implementation of ``op`` for ``key``: its limits,
    then its own runtime check (one op of a backend can be usable while another is not,
    e.g. one C file that does not compile)."""
    _load(backend)
    if backend in _IMPORT_ERRORS:
        return False, _IMPORT_ERRORS[backend]
    entry = _REGISTRY[op].get(backend)
    if entry is None:
        return False, f"{backend} does not implement {op}"
    if entry.supports is not None:
        fits, limit = entry.supports(key)
        if not fits:
            return False, limit
    if entry.available is not None:
        return entry.available(key.device)
    return True, ""


@functools.lru_cache(maxsize=1)
def _tuning_table() -> tuple[dict, ...]:
    if not TUNING_FILE.exists():
        return ()
    return tuple(json.loads(TUNING_FILE.read_text()).get("entries", []))


def _tuned(op: str, key: _Key) -> str | None:
    if key.device.type != "cuda" or not _tuning_table():
        return None
    want = (op, key.head_dim, key.block_size, str(key.dtype).replace("torch.", ""),
            torch.cuda.get_device_name(key.device))
    for e in _tuning_table():
        if (e["op"], e["head_dim"], e["block_size"], e["dtype"], e["device"]) == want:
            return e["backend"]
    return None


def _auto(op: str, key: _Key) -> str:
    if op in _FORCED:
        return _FORCED[op]
    order = _AUTO_ORDER.get(key.device.type, ("torch",))
    tuned = _tuned(op, key)
    for backend in ((tuned,) if tuned else ()) + order:
        if _status(op, backend, key)[0]:
            return backend
    for backend in order:
        if backend in _REGISTRY[op]:
            return backend   # unusable: resolve raises with its reason
    raise ValueError(f"op: no backend implements {op!r} on {key.device}")


def _key(device, dtype, head_dim, block_size) -> _Key:
    return _Key(torch.device(device), dtype, head_dim, block_size)


def resolved_backend(op: str, backend: str = "auto", *, device="cpu", dtype=None,
                     head_dim: int | None = None, block_size: int | None = None) -> str:
    """The backend ``resolve`` would run ``op`` with (after ``auto`` and per-op fallback)."""
    _check_op(op)
    _check_backend(backend)
    key = _key(device, dtype, head_dim, block_size)
    if backend != "auto":
        _load(backend)
    # a backend that failed to import keeps its name, so resolve reports why
    if backend == "auto" or (backend not in _REGISTRY[op] and backend not in _IMPORT_ERRORS):
        backend = _auto(op, key)
    return backend


def resolve(op: str, backend: str = "auto", *, device="cpu", dtype=None,
            head_dim: int | None = None, block_size: int | None = None) -> Callable:
    """The implementation of ``op`` on ``backend`` for these arguments (memoised).

    backend: one of ``BACKENDS`` or "auto"; a backend that does not implement
    ``op`` falls back to ``auto`` for it. Raises ValueError naming the
    argument for an unknown op or backend, or when the chosen implementation
    cannot run here (the reason included).
    """
    # A plain dict lookup on a hit, so a compiled step traces it without a graph break.
    # NBP_CPU_ISA is part of the key: it decides whether the cpu kernels run, and it
    # may change between calls (tests and the ISA ablations switch it).
    key = (op, backend, device, dtype, head_dim, block_size, os.environ.get("NBP_CPU_ISA"))
    fn = _CACHE.get(key)
    if fn is None:
        fn = _CACHE[key] = _resolve(op, backend, device, dtype, head_dim, block_size)
    return fn


def _resolve(op, backend, device, dtype, head_dim, block_size) -> Callable:
    name = resolved_backend(op, backend, device=device, dtype=dtype, head_dim=head_dim,
                            block_size=block_size)
    ok, why = _status(op, name, _key(device, dtype, head_dim, block_size))
    if not ok:
        raise ValueError(f"backend: {name!r} cannot run {op} on {torch.device(device)}: {why}")
    return _REGISTRY[op][name].function(op)


def status_table(device: torch.device | str = "cpu") -> list[tuple[str, str, bool, str]]:
    """(op, backend, usable, why not) for every op x backend on ``device`` (any shape)."""
    key = _key(device, None, None, None)
    rows = []
    for backend in BACKENDS:
        _load(backend)
    for op in OPS:
        for backend in BACKENDS:
            ok, why = _status(op, backend, key)
            rows.append((op, backend, ok, why))
    return rows


@contextlib.contextmanager
def forced(**ops: str):
    """While open, ``auto`` resolves each given op to the given backend."""
    for op, backend in ops.items():
        _check_op(op)
        _check_backend(backend, allow_auto=False)
    saved = dict(_FORCED)
    _FORCED.update(ops)
    _CACHE.clear()
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)
        _CACHE.clear()
