"""Compile every Triton kernel of this backend for a GPU target, without a GPU.

    TRITON_INTERPRET=0 python -m nbp_kernels.ops._compile_check [--arch 90] [--dtype bf16]

The interpreter (CPU tests) runs kernels as Python and so never exercises
Triton's compiler: this lowers each kernel, with the tile sizes the backend
launches on a GPU, through Triton's own compiler and ptxas for ``sm_<arch>``,
and prints each kernel's shared-memory use. Exit status 0: all compiled.
"""
import argparse
import importlib
import math
import os
import sys

import torch

from ._common import head_split

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _signature(kernel, pointers: dict, floats: set, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def _shape_consts(d: int, dtype: str) -> dict:
    da, db = head_split(d)
    return dict(D=d, DA=da, DB=max(db, 16), HAS_B=db > 0, PREC="ieee" if dtype == "fp32" else "tf32")


def _jobs(dtype: str, d: int, hybrid: bool):
    """(kernel, pointer types, float args, constexprs, launch options) for every kernel."""
    bca = importlib.import_module("nbp_kernels.ops.block_causal_attention")
    bda = importlib.import_module("nbp_kernels.ops.block_decode_attention")
    kva = importlib.import_module("nbp_kernels.ops.kv_append")
    t, p = _DTYPES[dtype], "*" + dtype
    shape = _shape_consts(d, dtype)
    for kind, kernel, ptrs in (
            ("fwd", bca._fwd_kernel, dict(Q=p, K=p, V=p, O=p, LSE="*fp32")),
            ("dkdv", bca._bwd_dkdv_kernel, dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p)),
            ("dq", bca._bwd_dq_kernel, dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DQ=p))):
        bm, bn, warps, stages = bca._tiles(kind, t, d)
        yield (kernel, ptrs, {"qk_scale", "sm_scale"},
               dict(HYBRID=hybrid, BLOCK_M=bm, BLOCK_N=bn, **shape), dict(num_warps=warps, num_stages=stages))
    bd = 1 << math.ceil(math.log2(d))
    yield (bca._bwd_pre_kernel, dict(O=p, DO=p, DELTA="*fp32"), set(), dict(D=d, BLOCK_M=64, BLOCK_D=bd), {})
    for L in (16, 64):
        bm, bn, warps, stages = bda._tiles(L)
        yield (bda._decode_kernel,
               dict(Q=p, KC=p, VC=p, KN=p, VN=p, SEQ="*i32", OPART="*fp32", LPART="*fp32", OUT=p),
               {"qk_scale"}, dict(HAS_NEW=True, DIRECT=False, BLOCK_M=bm, BLOCK_N=bn, **shape),
               dict(num_warps=warps, num_stages=stages))
    yield (bda._decode_reduce_kernel, dict(OPART="*fp32", LPART="*fp32", OUT=p), set(),
           dict(D=d, BLOCK_M=16, BLOCK_D=bd), {})
    yield (kva._kv_append_kernel, dict(KC=p, VC=p, KN="*fp32", VN="*fp32", SEQ="*i32"), set(),
           dict(D=d, BLOCK_L=16, BLOCK_D=bd), {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100)")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    ap.add_argument("--head-dim", type=int, default=96)
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 turns kernels into Python: unset it to compile", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", args.arch, 32)
    for kernel, ptrs, floats, consts, opts in _jobs(args.dtype, args.head_dim, hybrid=True):
        src = ASTSource(kernel, _signature(kernel, ptrs, floats, consts), constexprs=consts)
        compiled = triton.compile(src, target=target, options=opts)
        print(f"{kernel.__name__}: sm_{args.arch} ok, shared memory {compiled.metadata.shared} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
