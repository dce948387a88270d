"""The Triton kernels compile for an H100 (sm_90) through Triton's real compiler, no GPU needed.

CPU tests run the kernels in the interpreter, which never lowers them; this
catches what only compilation sees (constexpr misuse, dot shapes, types).
Runs in a subprocess: the test session itself has TRITON_INTERPRET=1.
"""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton's NVIDIA backend (ptxas) is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("dtype, head_dim", [("bf16", 96)])  # the 700M model's path (split head dim)
def test_kernels_compile_for_sm90(tmp_path, dtype, head_dim):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))  # a cold cache
    proc = subprocess.run([sys.executable, "-m", "nbp_kernels.ops._compile_check", "--arch", "90",
                           "--dtype", dtype, "--head-dim", str(head_dim)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = [line for line in proc.stdout.splitlines() if ": sm_90 ok" in line]
    assert len(compiled) == 8, proc.stdout
