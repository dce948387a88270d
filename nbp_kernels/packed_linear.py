"""``packed_linear``: a linear layer for the few rows of a decode step (fp32, CPU).

``packed_linear(x, packed, bias, out_features)`` equals
``reference.linear(x, weight, bias)`` = ``x @ weight.T + bias`` with
``packed = pack_weight(weight)``: the weight [N, K] rearranged once into
panels of 16 output columns, float32 [ceil(N / 16), K, 16] (zero-padded).
``cpu/packed_linear.c`` streams each weight panel from memory once per call
(8-row register tiles; further rows find it in L2), so a 16-row NBP step pays
about what a 1-row NTP step pays for the weights (MKL
repacks the weight on every small-M call and runs such products at a third
of the FMA peak; numbers in ``benchmarks/bench_packed_linear.py``).

The C file is compiled at first use (``nbp_kernels.cpu_build``). It needs
x86-64 with AVX-512F; ``is_available()`` says why not otherwise, and callers
(``FastGenerator``) then use ``torch.nn.functional.linear``.
Inference only: there is no backward.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .cpu_build import load

__all__ = ["packed_linear", "pack_weight", "PackedLinear", "is_available", "PANEL", "MAX_ROWS"]

PANEL = 16          # output columns per packed panel (one AVX-512 register)
MAX_ROWS = 32       # PackedLinear routes larger products (prefill) to the BLAS GEMM
# ... and one-row products with fewer weights than this to MKL's GEMV, which
# was measured faster there (benchmarks/bench_packed_linear.py): with one row
# there is no weight reuse across rows for the panels to win.
GEMV_MIN_WEIGHTS = 1 << 20


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why it cannot be used here)."""
    lib, why = load("packed_linear")
    if lib is not None:
        lib.nbp_packed_linear.restype = None
        lib.nbp_packed_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int64]
    return lib, why


def is_available() -> tuple[bool, str]:
    """(usable, reason): compiles the kernel on the first call."""
    lib, why = _load()
    return lib is not None, why


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight float32 [N, K] (CPU) -> panels float32 [ceil(N / 16), K, 16], zero-padded."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-d tensor [out_features, in_features], got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"weight: expected float32 on the CPU, got {weight.dtype} on {weight.device}")
    N, K = weight.shape
    padded = weight.new_zeros(-(-N // PANEL) * PANEL, K)
    padded[:N] = weight.detach()
    return padded.view(padded.shape[0] // PANEL, PANEL, K).transpose(1, 2).contiguous()


def _check(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int):
    for name, t in (("x", x), ("packed", packed), ("bias", bias)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"{name}: expected float32 on the CPU, got {t.dtype} on {t.device}")
    if not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"out_features: expected a positive int, got {out_features!r}")
    if packed.dim() != 3 or packed.shape[2] != PANEL or packed.shape[0] != -(-out_features // PANEL):
        raise ValueError(f"packed: expected pack_weight's layout [{-(-out_features // PANEL)}, K, "
                         f"{PANEL}] for {out_features} outputs, got {tuple(packed.shape)}")
    if x.dim() < 1 or x.shape[-1] != packed.shape[1]:
        raise ValueError(f"x: expected [..., {packed.shape[1]}] (in_features), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {tuple(bias.shape)}")
    if packed.requires_grad or x.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("packed_linear: inference only; pass tensors that do not require grad")


def _launch(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
            out_features: int) -> torch.Tensor:
    """The kernel call on checked arguments (packed and bias contiguous)."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(f"packed_linear is not usable here: {why}")
    M, K = x.shape[:-1].numel(), x.shape[-1]
    x2 = x.reshape(M, K).contiguous()
    y = torch.empty(M, out_features, dtype=torch.float32)
    if M and K:
        lib.nbp_packed_linear(x2.data_ptr(), M, K, packed.data_ptr(),
                              None if bias is None else bias.data_ptr(), y.data_ptr(), out_features)
    elif M:
        y.copy_(bias.expand(M, -1) if bias is not None else torch.zeros_like(y))
    return y.view(*x.shape[:-1], out_features)


@torch.library.custom_op("nbp::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                      out_features: int) -> torch.Tensor:
    return _launch(x, packed.contiguous(), None if bias is None else bias.contiguous(),
                   out_features)


@_packed_linear_op.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int) -> torch.Tensor:
    """x float32 [..., K] -> float32 [..., out_features] (= x @ W.T + bias).

    packed: ``pack_weight(W)`` [ceil(out_features / 16), K, 16]; bias: [out_features] or None.
    """
    _check(x, packed, bias, out_features)
    return _packed_linear_op(x, packed, bias, out_features)


class PackedLinear:
    """An ``nn.Linear``'s weights packed once for ``packed_linear`` (a frozen copy).

    ``__call__(x)``: x float32 [..., in_features] -> [..., out_features]; more
    than ``MAX_ROWS`` rows, or one row against fewer than ``GEMV_MIN_WEIGHTS``
    weights, go through the module's own (BLAS) forward, which is faster there.
    """

    def __init__(self, module: torch.nn.Linear):
        self.module = module
        self.packed = pack_weight(module.weight.detach())
        self.bias = None if module.bias is None else module.bias.detach().contiguous()
        self.out_features = module.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows > MAX_ROWS or (rows == 1 and self.packed.numel() < GEMV_MIN_WEIGHTS):
            return self.module(x)
        if torch.compiler.is_compiling():
            return packed_linear(x, self.packed, self.bias, self.out_features)
        # Eager decode steps call this ~40 times each: the weights were checked
        # when packed, so only x is, and the kernel is called without the
        # custom-op dispatch (tens of microseconds per call on a 2-core CPU).
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != self.packed.shape[1] \
                or x.requires_grad:
            _check(x, self.packed, self.bias, self.out_features)
        return _launch(x, self.packed, self.bias, self.out_features)
