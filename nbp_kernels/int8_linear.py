"""``int8_linear``: int8 or int16 activations times int8 weights, for the rows of a decode
step (CPU).

``int8_linear(x, packed, corr, scale, bias, out_features, act_dtype=...)`` equals
``reference.int8_linear(x, stored, scale, bias, act_dtype)`` bit for bit, with
``(packed, corr) = pack_weight(stored)`` and ``stored, scale =
reference.quantize_weight(w, torch.int8)``: each row of x is rounded to int8 or
to 16-bit levels at every call (``reference.quantize_rows``) and multiplied with
the int8 weight in exact int32 dot products, then scaled. At 16 rows the
weight-only int8 kernel (``packed_linear``) is bound by its float32
multiply-adds; integer dot-product instructions do four (int8) or two (int16)
times as many per instruction (``benchmarks/ablations/cpu_weight_dtype.py``).
int16 rows keep 13-15 bits (``reference.act_levels``): their relative error,
about 1e-4 at most, is below that of the int8 weights themselves. Opt-in:
``PackedLinear(..., weight_dtype=torch.int8, act_dtype=torch.int8 | torch.int16)``.

``cpu/int8_linear.c`` is compiled for the ISA ``cpu_build.cpu_isa()`` picks.
``kernel_path()`` says which code runs: ``avx512-vnni`` (AVX512-VNNI
``vpdpbusd`` / ``vpdpwssd``, on an avx512 build where the CPU has it), ``avx2-vnni``
(AVX-VNNI ``vpdpbusd`` on 256-bit registers for int8 rows, on an avx2 build where the
CPU has it: Intel cores since Alder Lake, AMD Zen 5; int16 rows there take AVX2's
tiles, as fast), ``avx512`` / ``avx2`` (AVX2
``vpmaddubsw`` with the sign trick / ``vpmaddwd``) or ``neon`` / ``portable`` (plain C). Every path
computes the same integers, so the same floats. ``NBP_CPU_VNNI=off`` keeps a CPU off
the VNNI paths (so every path is tested on one machine).

``act="gelu"`` applies the exact GELU to each output in the kernel, after the
scaling (``reference.gelu`` of the reference's value, to a few ulp).
``norm=(weight, bias, eps)`` quantizes the LayerNorm of each row instead of the
row (normalised in the kernel, within float32 rounding of ``F.layer_norm``, so a
value at a rounding boundary may quantize one step apart from the reference's);
``residual`` [..., out_features] is added last (``reference.fused_linear``).
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from ._cpu_launch import (
    checked_act,
    checked_norm,
    checked_residual,
    check_rc,
    contiguous_or_none,
    norm_args,
    run_rows,
)
from .cpu_build import load

__all__ = [
    "ACT_DTYPES",
    "MAX_IN_FEATURES",
    "PANEL",
    "VNNI_ENV",
    "int8_linear",
    "is_available",
    "checked_act_dtype",
    "kernel_path",
    "pack_weight",
]

PANEL = 16                   # output columns per packed panel
MAX_IN_FEATURES = 131072     # 127 * 127 * K stays below 2**31: the int32 sums are exact
VNNI_ENV = "NBP_CPU_VNNI"
ACT_DTYPES = (torch.int8, torch.int16)   # what the rows of x are rounded to
_MODE_VNNI, _MODE_A16 = 1, 2             # int8_linear.c's mode bits
_VNNI_NAMES = {"avx512": "AVX512-VNNI", "avx2": "AVX-VNNI"}   # each x86 build's dot products


@functools.cache
def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.nbp_int8_linear.restype = ctypes.c_int
    lib.nbp_int8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_float, ctypes.c_void_p]
    lib.nbp_int8_vnni.restype = ctypes.c_int
    lib.nbp_int8_vnni.argtypes = []
    return lib


@functools.lru_cache(maxsize=16)
def _path(lib: ctypes.CDLL, isa: str, why: str, vnni_env: str) -> tuple[str, str]:
    if isa not in _VNNI_NAMES:
        return isa, f"{why}; VNNI is used only by the x86 builds"
    name = _VNNI_NAMES[isa]
    if vnni_env.strip().lower() in ("off", "0"):
        return isa, f"{why}; {VNNI_ENV}={vnni_env.strip()}"
    if lib.nbp_int8_vnni():
        rows = " for int8 rows (int16 rows: AVX2's tiles, as fast)" if isa == "avx2" else ""
        return f"{isa}-vnni", f"{why}; the CPU has {name}{rows} ({VNNI_ENV}=off disables it)"
    return isa, f"{why}; the CPU lacks {name}"


def _load() -> tuple[ctypes.CDLL | None, str | None, str]:
    """(library or None, path or None, reason) for the ISA in force now."""
    lib, isa, why = load("int8_linear", _bind)
    if lib is None:
        return None, None, why
    return (lib, *_path(lib, isa, why, os.environ.get(VNNI_ENV, "")))


def kernel_path() -> tuple[str | None, str]:
    """(path, reason): ``avx512-vnni``, ``avx2-vnni``, ``avx512``, ``avx2``, ``neon`` or
    ``portable``, or None and why the kernel cannot run here. Compiles the kernel on the
    first call."""
    return _load()[1:]


def is_available() -> tuple[bool, str]:
    """(usable, reason naming the code path)."""
    _, path, why = _load()
    return path is not None, (f"{path}: {why}" if path is not None else why)


def pack_weight(stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """stored int8 [N, K] (CPU) -> (packed int8 [ceil(N / 16), ceil(K / 4), 16, 4], corr int32
    [16 ceil(N / 16)]): packed[p, k, j, t] = stored[16 p + j, 4 k + t] (zero-padded), corr =
    128 x the column sums of stored (the VNNI path's offset)."""
    if not isinstance(stored, torch.Tensor) or stored.dim() != 2:
        raise ValueError(f"stored: expected a 2-d tensor [out_features, in_features], got "
                         f"{getattr(stored, 'shape', type(stored))}")
    if stored.dtype != torch.int8 or stored.device.type != "cpu":
        raise ValueError(f"stored: expected int8 on the CPU, got {stored.dtype} on {stored.device}")
    N, K = stored.shape
    if K > MAX_IN_FEATURES:
        raise ValueError(f"stored: expected at most {MAX_IN_FEATURES} in_features (exact int32 "
                         f"sums), got {K}")
    P, K4 = -(-N // PANEL), -(-K // 4)
    padded = stored.new_zeros(P * PANEL, K4 * 4)
    padded[:N, :K] = stored.detach()
    packed = padded.view(P, PANEL, K4, 4).permute(0, 2, 1, 3).contiguous()
    corr = (padded.sum(dim=1, dtype=torch.int64) * 128).to(torch.int32)
    return packed, corr


def checked_act_dtype(act_dtype) -> torch.dtype:
    """act_dtype if it is torch.int8 or torch.int16, else a ValueError naming it."""
    if act_dtype not in ACT_DTYPES:
        raise ValueError(f"act_dtype: expected torch.int8 or torch.int16, got {act_dtype!r}")
    return act_dtype


def mode(path: str | None, act_dtype: torch.dtype) -> int:
    """int8_linear.c's mode for kernel path ``path`` and activations ``act_dtype``."""
    return (_MODE_VNNI if path in ("avx512-vnni", "avx2-vnni") else 0) | (
        _MODE_A16 if act_dtype == torch.int16 else 0)


def _check(x, packed, corr, scale, bias, out_features, act=None, norm=None,
           residual=None, act_dtype=torch.int8) -> None:
    checked_act(act)
    checked_act_dtype(act_dtype)
    if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features < 1:
        raise ValueError(f"out_features: expected a positive int, got {out_features!r}")
    P = -(-out_features // PANEL)
    for name, t, dtype, shape in (("packed", packed, torch.int8, None),
                                  ("corr", corr, torch.int32, (P * PANEL,)),
                                  ("scale", scale, torch.float32, (out_features,)),
                                  ("x", x, torch.float32, None),
                                  ("bias", bias, torch.float32, (out_features,))):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu":
            raise ValueError(f"{name}: expected {dtype} on the CPU, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '-')}")
        if shape is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    if packed.dim() != 4 or packed.shape[0] != P or tuple(packed.shape[2:]) != (PANEL, 4):
        raise ValueError(f"packed: expected pack_weight's layout [{P}, ceil(K / 4), {PANEL}, 4] "
                         f"for {out_features} outputs, got {tuple(packed.shape)}")
    if x.dim() < 1 or -(-x.shape[-1] // 4) != packed.shape[1] or x.shape[-1] > MAX_IN_FEATURES:
        raise ValueError(f"x: expected [..., K] with ceil(K / 4) = {packed.shape[1]} (the packed "
                         f"weight's in_features), got {tuple(x.shape)}")
    if any(t is not None and t.requires_grad for t in (x, packed, corr, scale, bias)):
        raise ValueError("int8_linear: inference only; pass tensors that do not require grad")
    checked_norm(norm, x.shape[-1])
    checked_residual(residual, x, out_features)


def _launch(x: torch.Tensor, packed: torch.Tensor, corr: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None, out_features: int, act: str | None = None, norm=None,
            residual: torch.Tensor | None = None, act_dtype: torch.dtype = torch.int8
            ) -> torch.Tensor:
    """The kernel call on checked arguments (packed, corr, scale, bias and norm's tensors
    contiguous)."""
    lib, path, why = _load()
    if lib is None:
        raise RuntimeError(f"int8_linear is not usable here: {why}")
    code, n_args, m = checked_act(act), norm_args(norm), mode(path, act_dtype)

    def kernel(x2, M, K, y, r2):
        rc = lib.nbp_int8_linear(x2.data_ptr(), M, K, packed.data_ptr(), corr.data_ptr(),
                                 scale.data_ptr(), None if bias is None else bias.data_ptr(),
                                 y.data_ptr(), out_features, m, code,
                                 *n_args, None if r2 is None else r2.data_ptr())
        check_rc(f"int8_linear ({path})", rc)
    return run_rows(x, out_features, bias, kernel, act, residual)


@torch.library.custom_op("nbp::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, packed: torch.Tensor, corr: torch.Tensor,
                    scale: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int, act: str | None = None,
                    norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                    norm_eps: float | None = None,
                    residual: torch.Tensor | None = None,
                    act_dtype: torch.dtype = torch.int8) -> torch.Tensor:
    norm = None if norm_eps is None else (contiguous_or_none(norm_weight),
                                          contiguous_or_none(norm_bias), norm_eps)
    return _launch(x, packed.contiguous(), corr.contiguous(), scale.contiguous(),
                   contiguous_or_none(bias), out_features, act, norm, residual, act_dtype)


@_int8_linear_op.register_fake
def _(x, packed, corr, scale, bias, out_features, act=None, norm_weight=None, norm_bias=None,
      norm_eps=None, residual=None, act_dtype=torch.int8):
    return x.new_empty(*x.shape[:-1], out_features)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, corr: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None, out_features: int, act: str | None = None,
                norm=None, residual: torch.Tensor | None = None,
                act_dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """x float32 [..., K] -> float32 [..., out_features], ``reference.int8_linear``'s value
    with x's rows rounded to act_dtype (torch.int8 or torch.int16; bit for bit), or with
    act="gelu" the exact GELU of it (to a few ulp); with norm (weight, bias, eps) that
    of the LayerNorm of x's rows (weight, bias float32 [K] or None), with residual
    (float32 [..., out_features]) plus it, after the activation.

    (packed, corr): ``pack_weight(stored)`` for the int8 weight stored [out_features, K];
    scale: its float32 [out_features] scales; bias: float32 [out_features] or None.
    x must be finite (a NaN or inf has no int8 value).
    """
    _check(x, packed, corr, scale, bias, out_features, act, norm, residual, act_dtype)
    nw, nb, eps = checked_norm(norm, x.shape[-1]) or (None, None, None)
    return _int8_linear_op(x, packed, corr, scale, bias, out_features, act, nw, nb, eps, residual,
                           act_dtype)
