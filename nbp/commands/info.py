"""``nbp info``: versions, devices, the CPU kernels' instruction set and threads, and the
kernel registry's table per device: every op x backend, usable or why not
(``nbp_kernels.registry.status_table``)."""
from __future__ import annotations

import json
import os
import platform


def collect() -> dict:
    import torch

    import nbp
    from nbp_kernels import registry

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    info = {
        "nbp": nbp.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "devices": {d: (torch.cuda.get_device_name(d) if d != "cpu" else platform.processor() or "cpu")
                    for d in devices},
        "backends": {d: {b: (ok if ok else f"no ({why})")
                         for b in registry.BACKENDS
                         for ok, why in [registry.backend_status(b, d)]}
                     for d in devices},
        "ops": {d: [{"op": op, "backend": b, "implemented": b in registry.backends_for(op),
                     "usable": ok, "why": why}
                    for op, b, ok, why in registry.status_table(d)]
                for d in devices},
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from nbp_kernels import (decode_attention_cpu, decode_step_cpu, int8_linear, packed_linear,
                             prefill_gemm, sample_cpu)
    from nbp_kernels.cpu_build import cpu_isa
    from nbp_kernels.cuda_ops import build_info
    info["cuda_extension"] = build_info()
    isa, why = cpu_isa()
    info["cpu_isa"] = {"isa": isa, "why": why}
    from nbp.devices import tokenizer_dtype
    tok_dtype, tok_why = tokenizer_dtype("auto", "cpu")
    info["cpu_tokenizer_dtype"] = {"dtype": str(tok_dtype)[6:], "why": tok_why}
    info["cpu_threads"] = {"threads": torch.get_num_threads(),
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                           "gomp_spincount": os.environ.get("GOMP_SPINCOUNT")}
    for name, mod in (("packed_linear", packed_linear), ("sample_cpu", sample_cpu),
                      ("decode_attention_cpu", decode_attention_cpu),
                      ("decode_step_cpu", decode_step_cpu)):
        ok, why = mod.is_available()
        info[name] = True if ok else f"no ({why})"
    path, why = int8_linear.kernel_path()
    info["int8_linear"] = {"path": path, "why": why}
    path, why = packed_linear.bf16_path()
    info["bf16_activations"] = {"path": path, "why": why}
    route, why = prefill_gemm.route()
    info["prefill_gemm"] = {"route": route, "why": why}
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info))
        return 0
    for key in ("nbp", "python", "torch", "triton", "cuda_runtime", "cuda_extension"):
        print(f"{key:>16}: {info[key]}")
    isa, threads = info["cpu_isa"], info["cpu_threads"]
    print(f"{'cpu_isa':>16}: {isa['isa']} ({isa['why']})")
    waits = ", ".join(f"{k.upper()}={threads[k]}" for k in ("omp_wait_policy", "gomp_spincount")
                      if threads[k] is not None) or "libgomp's default: long spin-waits"
    print(f"{'cpu_threads':>16}: {threads['threads']} ({waits}; --threads sets them)")
    tok = info["cpu_tokenizer_dtype"]
    print(f"{'cpu_tokenizer':>16}: {tok['dtype']} ({tok['why']}; --tokenizer-dtype sets it)")
    for key, label, use in (
            ("packed_linear", "packed_linear", "CPU decode linears, float32/bfloat16/int8 weights"),
            ("sample_cpu", "sample_cpu", "float32 CPU sampler"),
            ("decode_attention_cpu", "decode_attention",
             "float32 CPU decode attention (4+ queries outside decode_step)"),
            ("decode_step_cpu", "decode_step", "a CPU decode step in one C call")):
        print(f"{label:>16}: {f'yes ({use})' if info[key] is True else info[key]}")
    i8 = info["int8_linear"]
    print(f"{'int8_linear':>16}: " + (f"{i8['path']} (int8 and int16 activations: {i8['why']})"
                                       if i8["path"] else f"no ({i8['why']})"))
    bf = info["bf16_activations"]
    print(f"{'bf16_activations':>16}: " + (
        f"{bf['path']} (bfloat16 weights and activations: {bf['why']})" if bf["path"]
        else f"no ({bf['why']})"))
    pf = info["prefill_gemm"]
    print(f"{'prefill_gemm':>16}: {pf['route']} (float32 CPU prefill linears: {pf['why']})")
    for dev, name in info["devices"].items():
        print(f"{'device':>16}: {dev} ({name})")
        _print_table(info["ops"][dev])
    return 0


def _print_table(rows: list[dict]) -> None:
    """One line per op x backend that the backend implements; usable, or why not."""
    width = max(len(r["op"]) for r in rows)
    for r in rows:
        if not r["implemented"]:
            continue
        status = "yes" if r["usable"] else f"no ({r['why']})"
        print(f"{'':>16}{r['op']:<{width}}  {r['backend']:<10} {status}")


def register(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and the kernel op x backend table")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=run)
