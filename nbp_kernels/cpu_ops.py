"""The ``cpu`` backend: the C kernels of ``packed_linear``, ``sample_cpu`` and
``decode_attention_cpu`` as registry ops.

* ``linear``: ``PackedLinears(model, weight_dtype=None, act_dtype=None)``, the
  model's ``nn.Linear`` weights packed once for ``packed_linear`` (float32 CPU
  models; stored as float32, bfloat16 or int8), or for ``int8_linear`` (int8
  weights and int8 activations);
* ``keep_threshold`` / ``draw_kept``: ``sample_cpu``'s functions (float32 CPU rows);
* ``block_decode_attention``: ``decode_attention_cpu``'s (float32 CPU queries;
  other cache or new-block dtypes take the ``torch`` backend inside it);
* ``block_causal_attention``: ``decode_attention_cpu``'s, the same kernel over whole
  blocks (a prefill; other layouts take the ``torch`` backend inside it).

Each is usable where its C file compiles (``is_available()`` of its module);
``auto`` falls back to the op's ``torch`` implementation elsewhere.
"""
from __future__ import annotations

import torch

from . import decode_attention_cpu, packed_linear, sample_cpu
from ._cpu_launch import apply_norm
from .registry import register

__all__ = ["PackedLinears"]


class PackedLinears:
    """A linear function that runs every ``nn.Linear`` of ``model`` through
    ``packed_linear`` (float32 CPU models; weights packed once, here).

    weight_dtype: None or torch.float32 (the float32 weights), torch.bfloat16
    or torch.int8 (``reference.quantize_weight``): the packed copies' dtype.
    act_dtype: None (float32 activations), or torch.int8 or torch.int16 with int8
    weights: each row rounded to it per call, int32 dot products
    (``reference.int8_linear``); or torch.bfloat16 with bfloat16 weights: each row
    rounded to bfloat16, bfloat16 dot products where the CPU has them.
    ``__call__(module, x)``: x float32 [..., in_features] -> [..., out_features].
    With float32 weights, products of more than ``packed_linear.MAX_ROWS`` rows
    (the prefill) use the module's own forward; narrower weights are used at
    every row count (``PackedLinear``). The packed copies are not updated if
    the model's weights change later: build a new generator then.
    """

    def __init__(self, model: torch.nn.Module, weight_dtype: torch.dtype | None = None,
                 act_dtype: torch.dtype | None = None):
        self.weight_dtype, self.act_dtype = weight_dtype, act_dtype
        self.packed = {m: packed_linear.PackedLinear(m, weight_dtype, act_dtype)
                       for m in model.modules() if isinstance(m, torch.nn.Linear)}
        self._fused: dict[tuple, packed_linear.PackedLinear] = {}
        # LayerNorm -> its (weight, bias, eps), one tuple each, which PackedLinear then
        # checks once (not at each of a decode step's calls)
        self._norms: dict[torch.nn.LayerNorm, tuple] = {}

    def __call__(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self.packed[module](x)

    def fused(self, module: torch.nn.Linear, x: torch.Tensor,
              norm: torch.nn.LayerNorm | None = None, act: str | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """``residual + act(self(module, norm(x)))`` in one kernel launch: norm (a LayerNorm
        over the last dimension, affine or not) as the kernel's prologue, act (None or
        "gelu", the exact GELU) and residual (float32 [..., out_features]) in its epilogue,
        so a decode step has no torch LayerNorm or add between its linears. Float32
        prefills run ``F.layer_norm``, then oneDNN with the GELU or add fused
        (``prefill_gemm``), or on the BLAS route the module's forward with ``F.gelu``
        and the add in torch."""
        return self.packed[module](x, act=act, norm=self.norm_args(norm), residual=residual)

    def norm_args(self, norm: torch.nn.LayerNorm | None):
        """``norm`` as the kernels' (weight, bias, eps), the same tuple at every call."""
        if norm is None:
            return None
        args = self._norms.get(norm)
        if args is None:
            args = self._norms[norm] = _norm_args(norm)
        return args

    def many(self, modules: tuple[torch.nn.Linear, ...], x: torch.Tensor,
             norm: torch.nn.LayerNorm | None = None) -> tuple[torch.Tensor, ...]:
        """``self.fused(m, x, norm)`` for each m, as one kernel launch over their stacked
        weights (norm: the LayerNorm all of them read x through, as ``fused``).

        Each output column is computed exactly as alone (same weights, scales and
        summation order; int8 activations: the same quantized rows), so the results
        are bit-identical to separate calls;
        where a part would leave the kernel (float32 prefills: oneDNN or BLAS; small
        one-row products: BLAS) every part is called alone, on x normalised once. The
        stacked copy is packed at the first call.
        """
        parts = [self.packed[m] for m in modules]
        args = self.norm_args(norm)
        if any(p.takes_module(x.numel() // max(x.shape[-1], 1)) for p in parts):
            x = apply_norm(x, args)
            return tuple(p(x) for p in parts)
        return self.stacked(modules)(x, norm=args).split([m.out_features for m in modules],
                                                         dim=-1)

    def stacked(self, modules: tuple[torch.nn.Linear, ...]) -> packed_linear.PackedLinear:
        """The PackedLinear of ``modules``' weights side by side (``PackedLinear.stacked``),
        packed at the first call."""
        fused = self._fused.get(modules)
        if fused is None:
            fused = self._fused[modules] = packed_linear.PackedLinear.stacked(
                [self.packed[m] for m in modules])
        return fused


def _norm_args(norm: torch.nn.LayerNorm | None):
    """A LayerNorm over the last dimension as the kernels' (weight, bias, eps), or None."""
    if norm is None:
        return None
    if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
        raise ValueError(f"norm: expected None or an nn.LayerNorm over the last dimension, got "
                         f"{norm!r}")
    weight, bias = (None if t is None else t.detach() for t in (norm.weight, norm.bias))
    return weight, bias, norm.eps


def _float32_cpu(key) -> tuple[bool, str]:
    if key.device.type != "cpu":
        return False, f"the cpu kernels run on the CPU, got device {key.device}"
    if key.dtype is not None and key.dtype != torch.float32:
        return False, f"the cpu kernels take float32, got {key.dtype}"
    return True, ""


def _module_available(module):
    return lambda device: module.is_available()


register("linear", "cpu", PackedLinears, available=_module_available(packed_linear),
         supports=_float32_cpu)
register(("keep_threshold", "draw_kept"), "cpu", "nbp_kernels.sample_cpu",
         available=_module_available(sample_cpu), supports=_float32_cpu)
register(("block_decode_attention", "block_causal_attention"), "cpu",
         "nbp_kernels.decode_attention_cpu", available=_module_available(decode_attention_cpu),
         supports=_float32_cpu)
