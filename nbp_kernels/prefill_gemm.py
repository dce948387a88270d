"""The float32 prefill's GEMMs through oneDNN.

A CPU prefill (hundreds of rows) is compute-bound, unlike a decode step: the
packed decode kernels (``packed_linear``) are built for at most ``MAX_ROWS`` rows
and the larger products went to the module's BLAS call (``F.linear``). oneDNN,
which torch ships, multiplies the same float32 weight and fuses the exact (erf)
GELU or the residual's add into the product (``torch.ops.mkldnn._linear_pointwise``).
Measured side by side on a 2-core AMD EPYC Zen 4 (2 threads): the K600 model's
512-token prefill 1.20x faster than through BLAS (paired median of 31 rounds,
benchmarks/ablations/cpu_prefill_gemm.py). A copy of each weight reordered into
oneDNN's blocked layout (``_reorder_linear_weight``) was another 1.02x (1.03-1.07x in
later runs), not worth a second float32 copy of every layer's weight.

With torch's libraries held to AVX2 on the same machine (``ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``, as on a CPU without AVX-512) oneDNN was no faster:
0.96-0.98x of BLAS (paired medians of three runs, each beside an unheld run: 1.12-1.21x;
benchmarks/results/cpu_prefill_gemm_2t_*_avx2libs_run*.json, *_native_run*.json).

``NBP_PREFILL_GEMM=onednn|blas`` forces a route (``onednn`` falls back to BLAS
where this torch lacks the op); the default is oneDNN where its AVX-512 kernels
run (an x86-64 CPU with AVX-512 F/BW/DQ/VL, and no ``ONEDNN_MAX_CPU_ISA`` below
it), BLAS elsewhere: on AVX2-only CPUs, measured no faster, and on other
architectures (e.g. AArch64, where torch's oneDNN may sit on another backend)
until measured. The two routes round differently (another summation order past
~100 terms): each is within float32 rounding of the exact product
(tests/test_prefill_gemm.py).
"""
from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn.functional as F

from . import cpu_build

__all__ = ["ENV", "route", "is_available", "linear"]

ENV = "NBP_PREFILL_GEMM"
X86_64 = ("x86_64", "amd64")
# oneDNN's cap on its kernels' instruction set (DNNL_: its name before oneDNN 2.x); values
# below AVX-512: SSE41, AVX, AVX2, AVX2_VNNI, AVX2_VNNI_2
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def route() -> tuple[str, str]:
    """("onednn" or "blas", why): the GEMM a float32 prefill's linears run.

    Raises ValueError for a value of ``NBP_PREFILL_GEMM`` other than onednn or blas.
    """
    forced = os.environ.get(ENV, "").strip().lower()
    if forced not in ("", "onednn", "blas"):
        raise ValueError(f"{ENV}: expected onednn or blas, got {forced!r}")
    if forced == "blas":
        return "blas", f"{ENV}=blas"
    if not forced:
        if platform.machine().lower() not in X86_64:
            return "blas", (f"the default on x86-64 only, where it was measured faster; this is "
                            f"{platform.machine()} ({ENV}=onednn forces it)")
        below = _below_avx512()
        if below:
            return "blas", (f"oneDNN was measured faster with AVX-512 only; {below} "
                            f"({ENV}=onednn forces it)")
    ok, why = is_available()
    if not ok:
        return "blas", why
    return "onednn", f"{ENV}=onednn" if forced else f"oneDNN runs here ({ENV}=blas overrides)"


def _below_avx512() -> str:
    """Why oneDNN's kernels here are below AVX-512 ("" when they are not): the CPU lacks the
    flags nbp's avx512 kernels need (F/BW/DQ/VL, oneDNN's avx512_core, and FMA), or
    ``ONEDNN_MAX_CPU_ISA`` caps them below it."""
    flags = cpu_build.cpu_flags()
    if not flags:
        return "this CPU's flags are unknown (no /proc/cpuinfo)"
    missing = [f for f in cpu_build.CPU_FLAGS["avx512"] if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    for name in ISA_CAPS:
        cap = os.environ.get(name, "").strip().upper()
        if cap.startswith(("SSE", "AVX2")) or cap == "AVX":
            return f"{name}={cap} holds oneDNN below it"
    return ""


@functools.lru_cache(maxsize=1)
def is_available() -> tuple[bool, str]:
    """(ok, reason): whether torch's oneDNN linear runs here and agrees with F.linear on a
    small product (a build whose op exists but fails is reported, not used)."""
    if not torch.backends.mkldnn.is_available():
        return False, "this torch is built without oneDNN (mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False, "this torch lacks torch.ops.mkldnn._linear_pointwise"
    g = torch.Generator().manual_seed(0)
    x, w, b, r = (torch.randn(*s, generator=g) for s in ((40, 24), (12, 24), (12,), (40, 12)))
    try:   # both forms the prefill calls: the GELU post-op and the residual add
        with torch.no_grad():
            y, z = linear(x, w, b, "gelu", None), linear(x, w, b, None, r)
    except (RuntimeError, NotImplementedError) as e:
        return False, f"torch's oneDNN linear failed: {str(e).splitlines()[0]}"
    want = F.linear(x, w, b)
    if not (torch.allclose(y, F.gelu(want), rtol=1e-4, atol=1e-5)
            and torch.allclose(z, want + r, rtol=1e-4, atol=1e-5)):
        return False, "torch's oneDNN linear disagrees with F.linear"
    return True, "oneDNN runs here"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None,
           residual: torch.Tensor | None) -> torch.Tensor:
    """act(x @ weight.T + bias) + residual through oneDNN, no autograd.

    x: float32 [..., K] (CPU); weight: float32 [N, K]; bias: float32 [N] or None;
    act: None or "gelu" (exact); residual: None or float32 [..., N]. Returns float32
    [..., N]. The GELU, or the add where there is no GELU, is oneDNN's post-op.
    """
    lead, n = x.shape[:-1], weight.shape[0]
    x2, w = x.reshape(-1, x.shape[-1]).contiguous(), weight.detach().contiguous()
    b = None if bias is None else bias.detach()
    op = torch.ops.mkldnn._linear_pointwise
    if residual is not None and act is None:
        return op.binary(x2, residual.reshape(-1, n).contiguous(), w, b, "add").view(*lead, n)
    y = op(x2, w, b, "gelu" if act else "none", [], "none" if act else "").view(*lead, n)
    return y if residual is None else y + residual
