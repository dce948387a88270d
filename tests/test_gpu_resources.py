"""GPU resources of every kernel for sm_90, checked without a GPU (benchmarks/gpu_resources.py).

The committed benchmarks/results/gpu_resources_sm90.json must cover every
Triton configuration production launches and every CUDA kernel in csrc/, with
no spill, no shared memory over the sm_90 limit and no register-file overflow
unless its ``waivers`` name the kernel with a reason. The slow test recompiles
a few configurations and checks the file still says what the compiler says.
The script runs in a subprocess: this session has TRITON_INTERPRET=1, which
would give the interpreter's tile sizes.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_resources.py"
RESULT = ROOT / "benchmarks" / "results" / "gpu_resources_sm90.json"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_resources", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _script(*args, timeout=600, **env):
    # PYTHONPATH: this checkout's nbp_kernels, whichever checkout is installed
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_problems_fail_unless_waived():
    gr = _module()
    ok = dict(key="k", kind="triton", kernel="_fwd_kernel", registers=128, threads=256, spill_stores=0,
              spill_loads=0, smem_bytes=gr.SMEM_LIMIT)
    assert gr.problems(ok) == []
    spill = dict(ok, spill_stores=8)
    smem = dict(ok, key="s", smem_bytes=gr.SMEM_LIMIT + 1)
    regs = dict(ok, key="r", registers=255, threads=512)
    assert all(len(gr.problems(r)) == 1 for r in (spill, smem, regs))
    data = dict(kernels=[spill, smem, regs], waivers={"k": "measured: spills only in a cold path"})
    errors = [e for e in gr.check(data, ["k", "s", "r", "missing"]) if not e.startswith("cuda kernel")]
    assert len(errors) == 3 and errors[0].startswith("missing: not in the file")
    assert any(e.startswith("s: shared memory") for e in errors) and any(e.startswith("r: 255 registers") for e in errors)


def test_ptxas_log_parsing():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 26624 bytes smem\n")
    assert _module().parse_ptxas(log) == {"_k": dict(registers=168, spill_stores=8, spill_loads=12,
                                                     stack_bytes=16, static_smem=26624)}


def test_committed_file_covers_production_without_unwaived_problems():
    pytest.importorskip("triton")
    data = json.loads(RESULT.read_text())
    assert data["arch"] == "sm_90" and data["smem_limit_bytes"] == 227 * 1024
    kinds = {r["kind"] for r in data["kernels"]}
    assert kinds == {"triton", "cuda"}
    dtypes = {(r["kernel"], r["dtype"], r["head_dim"]) for r in data["kernels"] if r["kind"] == "triton"}
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_decode_kernel", "_kv_append_kernel"):
        assert {(d, h) for k, d, h in dtypes if k == kernel} == {(d, h) for d in ("bf16", "fp16", "fp32")
                                                                  for h in (64, 96, 128)}, kernel
    proc = _script("--check")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "no unwaived problem" in proc.stdout


@pytest.mark.slow
def test_recompiled_configs_match_the_file(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend (ptxas) is not installed")
    import triton
    made_with = json.loads(RESULT.read_text())["triton"]
    if triton.__version__ != made_with:
        pytest.skip(f"the file holds triton {made_with}'s numbers; this is triton {triton.__version__}")
    proc = _script("--verify", "2", timeout=900, TRITON_CACHE_DIR=str(tmp_path))  # a cold cache
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.count(": same") == 2
