"""Registers, spills and shared memory of every GPU kernel for sm_90, without a GPU.

    TRITON_INTERPRET=0 python benchmarks/gpu_resources.py [--jobs 2]          # compile all, write the JSON
    TRITON_INTERPRET=0 python benchmarks/gpu_resources.py --check             # read the JSON: coverage, limits
    TRITON_INTERPRET=0 python benchmarks/gpu_resources.py --verify 3          # recompile 3 configs, compare

Every Triton kernel is lowered through Triton's compiler at each configuration
production launches (the tile sizes, warps and stages of ``_tiles`` on a GPU,
dtypes bf16/fp16/fp32, head dims 64/96/128, with and without the hybrid and
fused-append paths, the split and direct decode variants), and ptxas ``-v``
reports its registers, spills and static shared memory; Triton's own
shared-memory size (``metadata.shared``) is the dynamic part. Every CUDA
kernel in csrc/ is compiled with ``nvcc -arch=sm_90 -Xptxas -v``.

Pointers and strides are marked 16-byte divisible, as the launches of
contiguous torch tensors with head dims that are multiples of 16 specialise
them. A spill, a shared-memory size over the sm_90 limit or a register file
overflow is a problem unless ``waivers`` in the JSON names the kernel's key
with a reason (``--check`` exits 1 on an unwaived problem). The numbers hold
for the compiler versions the JSON records.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_resources_sm90.json"
SMEM_LIMIT = 227 * 1024          # bytes of shared memory one block may use on sm_90
REGISTER_FILE = 64 * 1024        # 32-bit registers per SM: registers x threads of one block must fit
DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIMS = (64, 96, 128)
DECODE_L = (1, 16, 64)           # NTP steps, the k600 block, the largest block a preset uses
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def _ops():
    import importlib
    return tuple(importlib.import_module(f"nbp_kernels.ops.{m}")
                 for m in ("block_causal_attention", "block_decode_attention", "kv_append"))


def _shape(dtype: str, d: int) -> dict:
    from nbp_kernels.ops._common import head_split
    da, db = head_split(d)
    return dict(D=d, DA=da, DB=max(db, 16), HAS_B=db > 0, PREC="ieee" if dtype == "fp32" else "tf32")


def _torch_dtype(dtype: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def _prefill_configs(dtype: str, d: int) -> list[dict]:
    bca = _ops()[0]
    p = "*" + dtype
    out = []
    for kind, kernel, ptrs in (
            ("fwd", "_fwd_kernel", dict(Q=p, K=p, V=p, O=p, LSE="*fp32")),
            ("dkdv", "_bwd_dkdv_kernel", dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p)),
            ("dq", "_bwd_dq_kernel", dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DQ=p))):
        bm, bn, warps, stages = bca._tiles(kind, _torch_dtype(dtype), d)
        for hybrid in (False, True):
            out.append(dict(module="block_causal_attention", kernel=kernel, ptrs=ptrs,
                            consts=dict(HYBRID=hybrid, BLOCK_M=bm, BLOCK_N=bn, **_shape(dtype, d)),
                            num_warps=warps, num_stages=stages))
    out.append(dict(module="block_causal_attention", kernel="_bwd_pre_kernel",
                    ptrs=dict(O=p, DO=p, DELTA="*fp32"),
                    consts=dict(D=d, BLOCK_M=64, BLOCK_D=1 << math.ceil(math.log2(d))), num_warps=4, num_stages=3))
    return out


def _decode_configs(dtype: str, d: int) -> list[dict]:
    bda = _ops()[1]
    p = "*" + dtype
    out = []
    for L in DECODE_L:
        bm, bn, warps, stages = bda._tiles(L)
        for has_new in (False, True):
            for direct in (False, True):
                out.append(dict(module="block_decode_attention", kernel="_decode_kernel",
                                ptrs=dict(Q=p, KC=p, VC=p, KN=p, VN=p, SEQ="*i32", OPART="*fp32",
                                          LPART="*fp32", OUT=p),
                                consts=dict(HAS_NEW=has_new, DIRECT=direct, BLOCK_M=bm, BLOCK_N=bn,
                                            **_shape(dtype, d)),
                                num_warps=warps, num_stages=stages))
        out.append(dict(module="kv_append", kernel="_kv_append_kernel",
                        ptrs=dict(KC=p, VC=p, KN=p, VN=p, SEQ="*i32"),
                        consts=dict(D=d, BLOCK_L=min(64, max(16, 1 << math.ceil(math.log2(L)))),
                                    BLOCK_D=1 << math.ceil(math.log2(d))),
                        num_warps=4, num_stages=3))
    out.append(dict(module="block_decode_attention", kernel="_decode_reduce_kernel",
                    ptrs=dict(OPART="*fp32", LPART="*fp32", OUT=p),
                    consts=dict(D=d, BLOCK_M=16, BLOCK_D=1 << math.ceil(math.log2(d))), num_warps=4, num_stages=3))
    return out


def config_key(cfg: dict) -> str:
    """A stable name of one compiled variant, e.g. ``triton:_fwd_kernel[*bf16 D=96 ... w8 s3]``."""
    consts = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(cfg["consts"].items()))
    return f"triton:{cfg['kernel']}[{cfg['ptrs'][next(iter(cfg['ptrs']))]} {consts} " \
           f"w{cfg['num_warps']} s{cfg['num_stages']}]"


def triton_configs() -> list[dict]:
    """Every (kernel, constexprs, warps, stages) production launches on a GPU, deduplicated."""
    from nbp_kernels.ops._common import interpreting
    if interpreting():
        raise SystemExit("TRITON_INTERPRET=1 gives the interpreter's 16x16 tiles: unset it")
    seen = {}
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for cfg in _prefill_configs(dtype, d) + _decode_configs(dtype, d):
                seen.setdefault(config_key(cfg), dict(cfg, dtype=dtype, head_dim=d))
    return list(seen.values())


def _signature(kernel, cfg: dict) -> tuple[dict, dict]:
    """(signature, attrs): pointers and stride arguments (sXXX) marked 16-divisible."""
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in cfg["consts"]:
            sig[name] = "constexpr"
        elif name in cfg["ptrs"]:
            sig[name], attrs[(i,)] = cfg["ptrs"][name], [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if re.fullmatch(r"s[a-z]+", name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v output -> {entry function: registers, spills, stack and static smem in bytes}."""
    out, entry = {}, None
    for line in log.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            entry = m.group(1)
            out[entry] = dict(registers=0, spill_stores=0, spill_loads=0, stack_bytes=0, static_smem=0)
        elif entry and (m := _PTXAS_SPILL.search(line)):
            out[entry].update(stack_bytes=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif entry and (m := _PTXAS_REGS.search(line)):
            out[entry].update(registers=int(m[1]), static_smem=int(m[2] or 0))
    return out


def compile_triton(cfg: dict, arch: int = 90) -> dict:
    """Compile one config for sm_<arch>; its resource record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    mod = {m.__name__.rsplit(".", 1)[1]: m for m in _ops()}[cfg["module"]]
    kernel = getattr(mod, cfg["kernel"])
    sig, attrs = _signature(kernel, cfg)
    src = ASTSource(kernel, sig, constexprs=cfg["consts"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        # the flags Triton's own ptxas call uses (its cubin has the same registers and stack)
        proc = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name=sm_{arch}a", str(ptx),
                               "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True)
    (usage,) = parse_ptxas(proc.stderr + proc.stdout).values()
    return dict(key=config_key(cfg), kind="triton", kernel=cfg["kernel"], dtype=cfg["dtype"],
                head_dim=cfg["head_dim"], threads=32 * cfg["num_warps"], num_stages=cfg["num_stages"],
                smem_bytes=compiled.metadata.shared + usage["static_smem"], **usage)


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return out[:len(names)] if len(out) >= len(names) else names


def _launch_bounds(src: str) -> dict[str, int]:
    """Kernel name -> threads per block from ``__launch_bounds__(N)`` (kThreads = 128)."""
    out = {}
    for m in re.finditer(r"__launch_bounds__\((\w+)\)\s+(\w+)\s*\(", src):
        out[m[2]] = int(m[1]) if m[1].isdigit() else 128
    return out


def compile_cuda(arch: int = 90) -> list[dict]:
    """Every __global__ kernel of csrc/*.cu through nvcc -arch=sm_<arch> -Xptxas -v."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        raise SystemExit("nvcc not found on PATH")
    rows = []
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v", "-c", str(cu),
                                   "-o", str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
        usage = parse_ptxas(proc.stderr + proc.stdout)
        bounds = _launch_bounds(cu.read_text())
        for mangled, name in zip(usage, _demangle(list(usage))):
            base = next((k for k in bounds if k in name), None)
            rows.append(dict(key=f"cuda:{cu.name}:{name}", kind="cuda", kernel=name,
                             threads=bounds.get(base, 0), smem_bytes=usage[mangled]["static_smem"],
                             **usage[mangled]))
    return rows


def problems(record: dict) -> list[str]:
    """What is wrong with one kernel's resources on sm_90 (empty: fine)."""
    out = []
    if record["spill_stores"] or record["spill_loads"]:
        out.append(f"spills {record['spill_stores']} B stores / {record['spill_loads']} B loads")
    if record["smem_bytes"] > SMEM_LIMIT:
        out.append(f"shared memory {record['smem_bytes']} B > {SMEM_LIMIT} B")
    if record["registers"] * record["threads"] > REGISTER_FILE:
        out.append(f"{record['registers']} registers x {record['threads']} threads > {REGISTER_FILE}")
    return out


def cuda_kernel_names() -> set[str]:
    """Names of the __global__ functions in csrc/*.cu."""
    return {m[1] for cu in (ROOT / "csrc").glob("*.cu")
            for m in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\(\w+\)\s+)?(\w+)\s*\(", cu.read_text())}


def check(data: dict, expected_keys: list[str]) -> list[str]:
    """Errors of a results file: a production config or a CUDA kernel missing, or an unwaived problem."""
    have = {r["key"]: r for r in data["kernels"]}
    errors = [f"{k}: not in the file (rerun benchmarks/gpu_resources.py)" for k in expected_keys if k not in have]
    cuda = " ".join(r["kernel"] for r in data["kernels"] if r["kind"] == "cuda")
    errors += [f"cuda kernel {k}: not in the file" for k in sorted(cuda_kernel_names()) if f"::{k}<" not in cuda
               and f"::{k}(" not in cuda]
    waivers = data.get("waivers", {})
    for key, rec in have.items():
        for p in problems(rec):
            if not str(waivers.get(key, "")).strip():
                errors.append(f"{key}: {p} (no waiver with a reason)")
    return errors


def verify(data: dict, configs: list[dict], n: int) -> list[str]:
    """Recompile ``n`` configs spread over the list; errors where the file's record differs."""
    if n <= 0:
        return []
    have = {r["key"]: r for r in data["kernels"]}
    errors = []
    for cfg in configs[::max(1, len(configs) // n)][:n]:
        rec = compile_triton(cfg)
        old = have.get(rec["key"], {})
        diff = {k: (old.get(k), v) for k, v in rec.items() if old.get(k) != v}
        print(f"verify {rec['key']}: {'same' if not diff else diff}", flush=True)
        if diff:
            errors.append(f"{rec['key']}: recompiled differs (file, now): {diff}")
    return errors


def _versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version
    def release(text: str) -> str:
        return next((ln.strip() for ln in text.splitlines() if "release" in ln), text.strip())
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    return dict(triton=triton.__version__, triton_ptxas=release(str(get_ptxas_version(90))), nvcc=release(nvcc))


def _compile_all(configs: list[dict], jobs: int) -> list[dict]:
    if jobs <= 1:
        return [compile_triton(c) for c in configs]
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(compile_triton, configs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--jobs", type=int, default=1, help="compiler processes")
    ap.add_argument("--check", action="store_true", help="only check the file against the configs")
    ap.add_argument("--verify", type=int, default=0, metavar="N",
                    help="recompile N configs (spread over the list) and compare with the file")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    configs = triton_configs()
    if args.check or args.verify:
        data = json.loads(args.out.read_text())
        errors = check(data, [config_key(c) for c in configs]) + verify(data, configs, args.verify)
        print("\n".join(errors) or f"ok: {len(configs)} triton configs covered, no unwaived problem")
        return 1 if errors else 0
    from nbp.io import atomic_write_text  # imported before the long compile, not after it

    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = _compile_all(configs, args.jobs) + compile_cuda()
    data = dict(arch="sm_90", smem_limit_bytes=SMEM_LIMIT, register_file=REGISTER_FILE, **_versions(),
                note="smem_bytes = Triton's dynamic shared memory + ptxas static smem",
                waivers=old.get("waivers", {}), kernels=rows)
    atomic_write_text(args.out, json.dumps(data, indent=1) + "\n")
    errors = check(data, [config_key(c) for c in configs])
    print(f"wrote {args.out}: {len(rows)} kernels")
    print("\n".join(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
