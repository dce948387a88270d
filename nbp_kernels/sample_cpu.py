"""``keep_threshold`` and ``draw_kept``: the CPU sampler's filter and draw (fp32).

``nbp.sampler`` needs, per row of a decode step, the threshold that top-k then
top-p leave (``keep_threshold``) and one inverse-CDF draw over the kept tokens
(``draw_kept``), or both in one call (``sample``, what ``nbp.sampler`` runs for
``draw="fast"``: each row is read from memory once, the draw runs over its
top-k survivors). ``cpu/sample_cpu.c`` selects without sorting (sampled
two-pivot selection, by rank and then by softmax mass), sums in float64, and
shares rows over torch's OpenMP threads (measurements against the numpy/torch
path: ``benchmarks/bench_sampler.py``). Semantics: ``reference.keep_threshold``
and ``reference.draw_kept``, equal up to the rounding of the float64 sums (a
row whose top-p mass lands within ~1e-12 of a token boundary, or whose u lands
within ~1e-7 of a token's CDF edge, may differ by that token).

Compiled at first use (``nbp_kernels.cpu_build``) for the ISA
``cpu_build.cpu_isa()`` picks (AVX-512 or AVX2 with glibc's libmvec on x86-64
Linux, NEON on AArch64, the portable build elsewhere; ``NBP_CPU_ISA`` forces one).
``is_available()`` says which, or why none, and ``nbp.sampler`` then uses its
numpy/torch path.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .cpu_build import load, usable

__all__ = ["keep_threshold", "draw_kept", "sample", "work_shape", "is_available"]

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


@functools.lru_cache(maxsize=None)
def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.nbp_keep_threshold.restype = lib.nbp_draw_kept.restype = None
    lib.nbp_keep_threshold.argtypes = [_P, _I64, _I64, _I64, _I64, ctypes.c_float, _P, _P, _P]
    lib.nbp_draw_kept.argtypes = [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P]
    lib.nbp_sample.restype = _I64
    lib.nbp_sample.argtypes = [_P, _I64, _I64, _I64, _I64, ctypes.c_float, _P, _P, _P]
    return lib


def _load() -> tuple[ctypes.CDLL | None, str, str]:
    """(library or None, isa, reason) for the ISA in force now."""
    return load("sample_cpu", _bind)


def is_available() -> tuple[bool, str]:
    """(usable, reason naming the ISA): compiles the kernels on the first call."""
    return usable("sample_cpu")


def _check_tensor(name: str, t, dtype: torch.dtype, shape: tuple[int, ...]):
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu":
        got = f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a {dtype} CPU tensor, got {got}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def _library() -> ctypes.CDLL:
    lib, isa, why = _load()
    if lib is None:
        raise RuntimeError(f"sample_cpu is not usable here: {why}")
    return lib


def keep_threshold(logits: torch.Tensor, top_k: int, top_p: float, *,
                   work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [N, V] -> (tau, row_max) float32 [N, 1]: keep ``logits >= tau``.

    Top-k (top_k in [1, V]) then top-p (top_p in (0, 1]) as ``reference.keep_threshold``.
    work: optional float32 scratch of ``work_shape(N, V)``, reused between calls
    (a fresh one per call costs page faults: see ``nbp.sampler.Scratch``).
    """
    N, V, work = _check_filter(logits, top_k, top_p, work)
    lib = _library()
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    tau = torch.empty(N, 1, dtype=torch.float32)
    row_max = torch.empty(N, 1, dtype=torch.float32)
    if N:
        lib.nbp_keep_threshold(x.data_ptr(), N, V, x.stride(0), top_k, float(top_p),
                               work.data_ptr(), tau.data_ptr(), row_max.data_ptr())
    if N and bool(tau.isnan().any()):
        raise ValueError("logits: a row holds NaN or +inf, or no finite value")
    return tau, row_max


def sample(logits: torch.Tensor, top_k: int, top_p: float, u: torch.Tensor, *,
           work: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """``keep_threshold`` then ``draw_kept`` in one pass of the kernels: (tokens, bad).

    logits float32 [N, V]; top_k, top_p, work as ``keep_threshold``; u float64 [N].
    tokens int64 [N]: each row's draw, equal to ``draw_kept(logits, *keep_threshold(...), u)``
    up to the rounding of the float64 sums (they are grouped differently); bad: how many
    rows hold NaN or +inf or no finite value: their tokens are -1. Each row is read from
    memory once (``cpu/sample_cpu.c``, ``nbp_sample``).
    """
    N, V, work = _check_filter(logits, top_k, top_p, work)
    _check_tensor("u", u, torch.float64, (N,))
    lib = _library()
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    uu = u.contiguous()
    index = torch.empty(N, dtype=torch.int64)
    bad = lib.nbp_sample(x.data_ptr(), N, V, x.stride(0), top_k, float(top_p), uu.data_ptr(),
                         work.data_ptr(), index.data_ptr()) if N else 0
    return index, bad


def _check_filter(logits, top_k, top_p, work) -> tuple[int, int, torch.Tensor]:
    """(N, V, work) after checking ``keep_threshold``'s arguments; a fresh work if None."""
    N, V = _check_logits(logits)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= V:
        raise ValueError(f"top_k: expected an int in [1, {V}], got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    if work is None:
        work = torch.empty(work_shape(N, V), dtype=torch.float32)
    _check_tensor("work", work, torch.float32, work_shape(N, V))
    if not work.is_contiguous():
        raise ValueError("work: expected a contiguous tensor")
    return N, V, work


def work_shape(rows: int, vocab: int) -> tuple[int, int]:
    """Shape of ``keep_threshold``'s scratch for ``rows`` x ``vocab`` logits: per row, the
    REGIONS (7) runs of vocab + 16 floats of ``cpu/sample_cpu.c``."""
    return rows, 7 * (vocab + 16)


def _check_logits(logits) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits: expected [N, V] with V >= 1, got {getattr(logits, 'shape', logits)}")
    _check_tensor("logits", logits, torch.float32, tuple(logits.shape))
    return logits.shape


def draw_kept(logits: torch.Tensor, tau: torch.Tensor, row_max: torch.Tensor,
              u: torch.Tensor) -> torch.Tensor:
    """logits float32 [N, V]; tau, row_max float32 [N, 1]; u float64 [N] -> int64 [N].

    One token per row, drawn by inverse CDF over ``logits >= tau`` with weights
    exp(logits - row_max), as ``reference.draw_kept``. Every row must keep a
    token with a finite weight (``row_max`` its largest logit, ``tau <= row_max``).
    """
    N, V = _check_logits(logits)
    _check_tensor("tau", tau, torch.float32, (N, 1))
    _check_tensor("row_max", row_max, torch.float32, (N, 1))
    _check_tensor("u", u, torch.float64, (N,))
    if N and not bool(torch.isfinite(row_max).all()):
        raise ValueError("row_max: expected finite values (a row of logits without a finite value?)")
    lib = _library()
    x = logits if logits.stride(1) == 1 else logits.contiguous()
    t, m, uu = tau.contiguous(), row_max.contiguous(), u.contiguous()
    cum = torch.empty(N, -(-V // 256), dtype=torch.float64)
    index = torch.empty(N, dtype=torch.int64)
    if N:
        lib.nbp_draw_kept(x.data_ptr(), N, V, x.stride(0), t.data_ptr(), m.data_ptr(),
                          uu.data_ptr(), cum.data_ptr(), index.data_ptr())
    if N and int(index.min()) < 0:
        raise ValueError("logits: a row has no kept token with a finite weight (NaN logits, "
                         "or tau above row_max?)")
    return index
