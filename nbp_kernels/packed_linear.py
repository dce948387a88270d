"""``packed_linear``: a linear layer for the few rows of a decode step (CPU).

Activations are float32; the weight is stored as float32, bfloat16, or int8
with one float32 scale per output channel (``reference.quantize_weight``).
``packed_linear(x, packed, bias, out_features, scale)`` equals
``reference.dequantized_linear(x, stored, scale, bias)`` (for float32,
``reference.linear(x, weight, bias)``) with ``packed = pack_weight(stored)``:
the weight [N, K] rearranged once into panels of 16 output columns,
[ceil(N / 16), K, 16] of the same dtype (zero-padded). ``cpu/packed_linear.c``
streams each weight panel from memory once per call, so a 16-row NBP step
reads the weights about as often as a 1-row NTP step, and narrower weights
read fewer bytes (measurements: ``benchmarks/bench_packed_linear.py``,
``benchmarks/ablations/cpu_weight_dtype.py``).

The C file is compiled at first use for the ISA ``cpu_build.cpu_isa()`` picks
(AVX-512, AVX2, NEON or the portable build; ``NBP_CPU_ISA`` forces one). ``is_available()`` says
which, or why none; callers (``FastGenerator``) then use
``torch.nn.functional.linear``. Inference only: there is no backward.

``act="gelu"`` applies the exact GELU (``torch.nn.GELU()``) to each output in
the kernel, after bias and scale (``reference.gelu_linear``): a decode step's
fc1 then needs no separate pass over its output. ``norm=(weight, bias, eps)``
normalises each row of x first (``F.layer_norm`` over the last dimension) and
``residual`` [..., out_features] is added last (``reference.fused_linear``): a
decode layer's LayerNorms and residual adds then run inside its kernels.

bfloat16 activations (``act_dtype=torch.bfloat16``, with bfloat16 weights only):
each row of x is rounded to bfloat16 too (after the LayerNorm), and the weights are
packed in k pairs (``pack_weight(stored, pairs=True)``, [ceil(N / 16), ceil(K / 2),
16, 2]), the operand layout of AVX512-BF16's ``vdpbf16ps``, which does twice the
multiply-adds of an FMA: a 16-row step, bound by its FMAs, gets faster, not just
narrower (``reference.fused_linear(..., act_dtype=torch.bfloat16)``; exact products,
float32 sums in another order). CPUs without AVX512-BF16 (``bf16_path()``;
``NBP_CPU_BF16=off`` forces it) widen the same pairs and use FMAs.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

from . import int8_linear, prefill_gemm, reference
from ._cpu_launch import (
    apply_norm,
    apply_torch,
    checked_act,
    checked_norm,
    checked_residual,
    check_rc,
    contiguous_or_none,
    norm_args,
    run_rows,
)
from .cpu_build import load, usable

__all__ = ["packed_linear", "pack_weight", "PackedLinear", "is_available", "checked_act_dtype",
           "PANEL", "MAX_ROWS", "WEIGHT_DTYPES", "ACT_DTYPES", "bf16_path", "kernel_code"]

PANEL = 16          # output columns per packed panel
MAX_ROWS = 32       # PackedLinear routes larger products (prefill) to the BLAS GEMM
# ... and one-row float32 products with fewer weights than this to the BLAS
# GEMV, which was faster there (benchmarks/bench_packed_linear.py).
GEMV_MIN_WEIGHTS = 1 << 20
WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}   # the C kernel's codes
_PAIRS, _PAIRS_DOT = 3, 4   # its codes for pair-packed bf16: FMAs, AVX512-BF16 dot products
# integers: int8_linear (int8 weights); bfloat16: pair-packed bfloat16 weights
ACT_DTYPES = (torch.float32, torch.int8, torch.int16, torch.bfloat16)
BF16_ENV = "NBP_CPU_BF16"


@functools.lru_cache(maxsize=None)
def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.nbp_packed_linear.restype = ctypes.c_int
    lib.nbp_bf16_dot.restype = ctypes.c_int
    lib.nbp_bf16_dot.argtypes = []
    lib.nbp_packed_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p]
    return lib


def _load() -> tuple[ctypes.CDLL | None, str, str]:
    """(library or None, isa, reason) for the ISA in force now."""
    return load("packed_linear", _bind)


def is_available() -> tuple[bool, str]:
    """(usable, reason naming the ISA): compiles the kernel on the first call."""
    return usable("packed_linear")


@functools.lru_cache(maxsize=16)
def _bf16_path(lib: ctypes.CDLL, isa: str, env: str) -> tuple[str, str]:
    if isa != "avx512":
        return isa, "AVX512-BF16 is used only by the avx512 build"
    if env.strip().lower() in ("off", "0"):
        return "avx512", f"{BF16_ENV}={env.strip()}"
    if lib.nbp_bf16_dot():
        return "avx512-bf16", f"the CPU has AVX512-BF16 ({BF16_ENV}=off disables it)"
    return "avx512", "the CPU lacks AVX512-BF16"


def bf16_path(loaded: tuple | None = None) -> tuple[str | None, str]:
    """(path, reason) of bfloat16 activations: ``avx512-bf16`` (vdpbf16ps), or the ISA in
    force (FMAs on widened pairs), or None and why the kernel cannot run here. loaded:
    ``_load()``'s result where the caller holds it (a launch)."""
    lib, isa, why = loaded or _load()
    if lib is None:
        return None, why
    return _bf16_path(lib, isa, os.environ.get(BF16_ENV, ""))


def kernel_code(packed: torch.Tensor, loaded: tuple | None = None) -> int:
    """The C kernel's code for ``pack_weight``'s output ``packed`` (pairs: the bf16 path in
    force, ``bf16_path``). loaded: as ``bf16_path``'s."""
    if packed.dim() != 4:
        return WEIGHT_DTYPES[packed.dtype]
    return _PAIRS_DOT if bf16_path(loaded)[0] == "avx512-bf16" else _PAIRS


def pack_weight(weight: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """weight [N, K] (float32, bfloat16 or int8, CPU) -> panels [ceil(N / 16), K, 16], same
    dtype, zero-padded. Store a float32 weight narrower with ``reference.quantize_weight``.
    pairs (bfloat16 only, for bfloat16 activations): [ceil(N / 16), ceil(K / 2), 16, 2],
    packed[p, i, j, t] = weight[16 p + j, 2 i + t] (zero-padded)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d tensor [out_features, in_features], got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype not in WEIGHT_DTYPES or weight.device.type != "cpu":
        raise ValueError(f"weight: expected float32, bfloat16 or int8 on the CPU, got "
                         f"{weight.dtype} on {weight.device}")
    if pairs and weight.dtype != torch.bfloat16:
        raise ValueError(f"weight: pairs=True packs bfloat16 weights, got {weight.dtype}")
    N, K = weight.shape
    P, K2 = -(-N // PANEL), -(-K // 2) * 2 if pairs else K
    padded = weight.new_zeros(P * PANEL, K2)
    padded[:N, :K] = weight.detach()
    if pairs:
        return padded.view(P, PANEL, K2 // 2, 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(P, PANEL, K).transpose(1, 2).contiguous()


def _check(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int,
           scale: torch.Tensor | None, act: str | None = None, norm=None,
           residual: torch.Tensor | None = None):
    checked_act(act)
    for name, t in (("x", x), ("bias", bias), ("scale", scale)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"{name}: expected float32 on the CPU, got {t.dtype} on {t.device}")
    if packed.dtype not in WEIGHT_DTYPES or packed.device.type != "cpu":
        raise ValueError(f"packed: expected float32, bfloat16 or int8 on the CPU, got "
                         f"{packed.dtype} on {packed.device}")
    if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features < 1:
        raise ValueError(f"out_features: expected a positive int, got {out_features!r}")
    P = -(-out_features // PANEL)
    pairs = packed.dim() == 4 and packed.dtype == torch.bfloat16 and packed.shape[3] == 2
    if packed.shape[:1] != (P,) or packed.shape[2:] != ((PANEL, 2) if pairs else (PANEL,)):
        raise ValueError(f"packed: expected pack_weight's layout [{P}, K, {PANEL}] (or bfloat16 "
                         f"pairs [{P}, ceil(K / 2), {PANEL}, 2]) for {out_features} outputs, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    width = None if x.dim() < 1 else -(-x.shape[-1] // 2) if pairs else x.shape[-1]
    if width != packed.shape[1]:
        want = f"[..., K] with ceil(K / 2) = {packed.shape[1]} (bfloat16 pairs of in_features)" \
            if pairs else f"[..., {packed.shape[1]}] (in_features)"
        raise ValueError(f"x: expected {want}, got {tuple(x.shape)}")
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and tuple(t.shape) != (out_features,):
            raise ValueError(f"{name}: expected shape ({out_features},), got {tuple(t.shape)}")
    if (scale is None) != (packed.dtype != torch.int8):
        raise ValueError(f"scale: expected float32 [{out_features}] with int8 weights and None "
                         f"otherwise, got {'None' if scale is None else 'a tensor'} with "
                         f"{packed.dtype} weights")
    if any(t is not None and t.requires_grad for t in (x, packed, bias, scale)):
        raise ValueError("packed_linear: inference only; pass tensors that do not require grad")
    checked_norm(norm, x.shape[-1])
    checked_residual(residual, x, out_features)


def _launch(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
            out_features: int, scale: torch.Tensor | None = None, act: str | None = None,
            norm=None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel call on checked arguments (packed, bias, scale and norm's tensors
    contiguous)."""
    loaded = _load()
    lib, why = loaded[0], loaded[2]
    if lib is None:
        raise RuntimeError(f"packed_linear is not usable here: {why}")
    code, n_args = checked_act(act), norm_args(norm)
    dtype = kernel_code(packed, loaded)

    def kernel(x2, M, K, y, r2):
        rc = lib.nbp_packed_linear(x2.data_ptr(), M, K, packed.data_ptr(), dtype,
                                   None if scale is None else scale.data_ptr(),
                                   None if bias is None else bias.data_ptr(), y.data_ptr(),
                                   out_features, code, *n_args,
                                   None if r2 is None else r2.data_ptr())
        check_rc("packed_linear", rc)
    return run_rows(x, out_features, bias, kernel, act, residual)


def _norm_of(weight, bias, eps):
    """The custom ops' three norm arguments as the launchers' ``norm``."""
    return None if eps is None else (contiguous_or_none(weight), contiguous_or_none(bias), eps)


@torch.library.custom_op("nbp::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                      out_features: int, scale: torch.Tensor | None = None,
                      act: str | None = None, norm_weight: torch.Tensor | None = None,
                      norm_bias: torch.Tensor | None = None, norm_eps: float | None = None,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
    return _launch(x, packed.contiguous(), contiguous_or_none(bias), out_features,
                   contiguous_or_none(scale), act, _norm_of(norm_weight, norm_bias, norm_eps),
                   residual)


@_packed_linear_op.register_fake
def _(x, packed, bias, out_features, scale=None, act=None, norm_weight=None, norm_bias=None,
      norm_eps=None, residual=None):
    return x.new_empty(*x.shape[:-1], out_features)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int, scale: torch.Tensor | None = None,
                  act: str | None = None, norm=None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [..., K] -> float32 [..., out_features]
    (= act(norm(x) @ W.T + bias) + residual, ``reference.fused_linear``).

    packed: ``pack_weight(stored)`` [ceil(out_features / 16), K, 16] (float32,
    bfloat16 or int8), or ``pack_weight(stored, pairs=True)`` (bfloat16 weights and
    activations: each row of x, after norm, is rounded to bfloat16); scale: float32 [out_features] for int8 weights (W = stored
    * scale[:, None]), else None; bias: float32 [out_features] or None; act:
    None or "gelu" (exact GELU, ``torch.nn.GELU()``, to a few ulp: not torch's
    float32 GELU bit for bit, which is less accurate for negative inputs); norm:
    None or (weight, bias, eps), a LayerNorm over the last dimension of x (weight,
    bias float32 [K] or None) applied to each row first; residual: None or float32
    [..., out_features] (x's leading dimensions), added after the activation.
    """
    _check(x, packed, bias, out_features, scale, act, norm, residual)
    nw, nb, eps = checked_norm(norm, x.shape[-1]) or (None, None, None)
    return _packed_linear_op(x, packed, bias, out_features, scale, act, nw, nb, eps, residual)


class PackedLinear:
    """An ``nn.Linear``'s weights packed once for ``packed_linear`` (a frozen copy).

    weight_dtype: None or torch.float32 (the module's float32 weight as is),
    torch.bfloat16 or torch.int8 (stored as ``reference.quantize_weight`` says).
    act_dtype: None or torch.float32 (float32 activations), or torch.int8 or
    torch.int16 (with int8 weights only): each call rounds x per row to it and runs
    ``int8_linear.int8_linear`` (``reference.int8_linear``; int32 dot products); or
    torch.bfloat16 (with bfloat16 weights only): x rounded to bfloat16, the weights
    packed in pairs (``pack_weight(..., pairs=True)``; dot products on AVX512-BF16).
    ``__call__(x, act=None, norm=None, residual=None)``: x float32 [..., in_features]
    -> [..., out_features], act(norm(x) @ W.T + bias) + residual with act None or
    "gelu", norm None or (weight, bias, eps) and residual None or float32
    [..., out_features], all inside the kernel (``packed_linear``). With
    float32 weights, more than ``MAX_ROWS`` rows (a prefill) go through oneDNN
    (``prefill_gemm``: the module's weight, GELU or residual add fused), or the
    module's BLAS GEMM where that route is off; one row against fewer than
    ``GEMV_MIN_WEIGHTS`` weights goes through the module too (faster there).
    Narrower weights go through the kernel at every row count: no float32 copy
    is kept. Outside the kernel, ``F.layer_norm`` precedes the product, and on
    the BLAS route ``F.gelu`` and the residual's add follow it.
    """

    def __init__(self, module: torch.nn.Linear, weight_dtype: torch.dtype | None = None,
                 act_dtype: torch.dtype | None = None):
        dtype = torch.float32 if weight_dtype is None else weight_dtype
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype: expected None, torch.float32, torch.bfloat16 or "
                             f"torch.int8, got {weight_dtype!r}")
        act = checked_act_dtype(act_dtype, dtype)
        weight = module.weight.detach()
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"module: expected a float32 CPU weight, got {weight.dtype} on "
                             f"{weight.device}")
        self.module, self.weight_dtype, self.act_dtype = module, dtype, act
        stored, self.scale = reference.quantize_weight(weight, dtype)
        self.packed, self.corr = (int8_linear.pack_weight(stored) if act in int8_linear.ACT_DTYPES
                                  else (pack_weight(stored, act == torch.bfloat16), None))
        self.bias = None if module.bias is None else module.bias.detach().contiguous()
        self.in_features, self.out_features = module.in_features, module.out_features
        self._norm_seen: tuple = (None, None)   # (the last norm passed, it checked)

    @classmethod
    def stacked(cls, parts: list[PackedLinear]) -> PackedLinear:
        """One PackedLinear whose outputs are those of ``parts`` (same in_features, same
        weight and activation dtypes) side by side: quantized per output channel, so each
        column is stored, and computed, as in its part (int8 activations: each row is
        quantized once, as for every part). It always runs the kernel (no module)."""
        if not parts or len({(p.weight_dtype, p.act_dtype, p.in_features) for p in parts}) != 1:
            raise ValueError("parts: expected PackedLinears of one weight dtype, activation "
                             "dtype and in_features")
        weight = torch.cat([p.module.weight.detach() for p in parts])
        has_bias = any(p.bias is not None for p in parts)
        module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        if has_bias:   # a zero bias adds exactly nothing to a part that has none
            module.bias = torch.nn.Parameter(torch.cat(
                [p.bias if p.bias is not None else weight.new_zeros(p.out_features)
                 for p in parts]), requires_grad=False)
        out = cls(module, parts[0].weight_dtype, parts[0].act_dtype)
        out.module = None   # no float32 copy kept: the parts serve the GEMM cases
        return out

    def takes_module(self, rows: int) -> bool:
        """Whether ``rows`` rows go through the module's BLAS call instead of the kernel."""
        return self.module is not None and self.weight_dtype == torch.float32 and (
            rows > MAX_ROWS or (rows == 1 and self.packed.numel() < GEMV_MIN_WEIGHTS))

    def __call__(self, x: torch.Tensor, act: str | None = None, norm=None,
                 residual: torch.Tensor | None = None) -> torch.Tensor:
        checked_act(act)
        if norm is not None or residual is not None:
            norm = self._check_extras(x, norm, residual)
        rows = x.numel() // max(x.shape[-1], 1)
        if self.takes_module(rows):
            if not self._onednn(x, rows):
                return apply_torch(self.module, x, norm, act, residual)
            return prefill_gemm.linear(apply_norm(x, norm), self.module.weight, self.module.bias,
                                       act, residual)
        int8 = self.act_dtype in int8_linear.ACT_DTYPES
        if torch.compiler.is_compiling():
            if int8:
                return int8_linear.int8_linear(x, self.packed, self.corr, self.scale, self.bias,
                                               self.out_features, act, norm, residual,
                                               self.act_dtype)
            return packed_linear(x, self.packed, self.bias, self.out_features, self.scale, act,
                                 norm, residual)
        # Eager decode steps call this ~40 times each: the weights were checked
        # when packed, so only x (and norm, residual) are, and the kernel is called
        # without the custom-op dispatch (tens of microseconds per call on a 2-core CPU).
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.in_features \
                or x.requires_grad:
            if int8:
                int8_linear._check(x, self.packed, self.corr, self.scale, self.bias,
                                   self.out_features, act_dtype=self.act_dtype)
            else:
                _check(x, self.packed, self.bias, self.out_features, self.scale)
            raise ValueError(f"x: expected [..., {self.in_features}] (in_features), got "
                             f"{tuple(x.shape)}")
        if int8:
            return int8_linear._launch(x, self.packed, self.corr, self.scale, self.bias,
                                       self.out_features, act, norm, residual, self.act_dtype)
        return _launch(x, self.packed, self.bias, self.out_features, self.scale, act, norm,
                       residual)

    def _onednn(self, x: torch.Tensor, rows: int) -> bool:
        """Whether the module's product of x (rows of it) goes through oneDNN
        (``prefill_gemm``): a prefill-sized x on that route, without autograd or
        torch.compile in play (the oneDNN op has neither); else the module's BLAS call."""
        grad = torch.is_grad_enabled() and (x.requires_grad or self.module.weight.requires_grad)
        return rows > MAX_ROWS and not grad and not torch.compiler.is_compiling() and \
            prefill_gemm.route()[0] == "onednn"

    def _check_extras(self, x: torch.Tensor, norm, residual: torch.Tensor | None):
        """The checked ``norm`` (contiguous); a ValueError naming norm, residual or x if one
        is wrong."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected [..., {self.in_features}] (in_features), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        checked_residual(residual, x, self.out_features)
        if norm is None or norm is self._norm_seen[0]:
            return self._norm_seen[1] if norm is not None else None
        checked = checked_norm(norm, self.in_features)
        checked = (contiguous_or_none(checked[0]), contiguous_or_none(checked[1]), checked[2])
        # A decode step passes the same tuple at every call: checked once (microseconds a
        # check, against ~20 a launch); a list may change, so it is checked every time
        if type(norm) is tuple:
            self._norm_seen = (norm, checked)
        return checked


def checked_act_dtype(act_dtype, weight_dtype: torch.dtype | None) -> torch.dtype:
    """``act_dtype`` (None: float32) as a dtype, or a ValueError naming it: torch.int8 and
    torch.int16 activations need torch.int8 weights (the integer dot products multiply
    both), torch.bfloat16 ones torch.bfloat16 weights."""
    act = torch.float32 if act_dtype is None else act_dtype
    if act not in ACT_DTYPES:
        raise ValueError(f"act_dtype: expected None, torch.float32, torch.int8, torch.int16 or "
                         f"torch.bfloat16, got {act_dtype!r}")
    need = torch.bfloat16 if act == torch.bfloat16 else torch.int8
    if act != torch.float32 and weight_dtype != need:
        raise ValueError(f"act_dtype: {act} activations need weight_dtype={need}, got "
                         f"weight_dtype={weight_dtype!r}")
    return act
