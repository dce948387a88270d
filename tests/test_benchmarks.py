"""The benchmark suite stays runnable: ``pytest benchmarks/`` collects every ``bench_*.py``
module (and one test per op at least), and a tiny timed run records what it measured.

The full smoke run of every body (``pytest benchmarks/ --benchmark-disable``) is
a separate line of .ci/run.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# every op and workload the suite must cover, as it appears in the test names
COVERED = ["test_block_causal_attention_forward[", "test_block_causal_attention_forward_backward[",
           "test_block_decode_attention_fused_append[", "test_kv_append_[", "test_generate_tokens_fast_generator[",
           "test_generate_tokens_published_baseline[", "test_sampler[", "test_packed_linear[",
           "test_tokenizer_encode", "test_tokenizer_decode", "test_decode_step_cpu[",
           "test_block_causal_attention_cpu_prefill["]


def _pytest(*args, **env):
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    full.pop("TRITON_INTERPRET", None)  # the suite runs as a user runs it, not under tests/conftest.py
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=600)


def test_collection_finds_every_bench_module():
    proc = _pytest("benchmarks/", "--collect-only", "-q", NBP_BENCH_SMOKE="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    modules = {i.split("::")[0] for i in ids}
    expected = {f"benchmarks/{p.name}" for p in BENCH.glob("bench_*.py")}
    assert len(expected) >= 7 and modules == expected, (modules, expected)
    for name in COVERED:
        assert any(f"::{name}" in i for i in ids), f"no benchmark named {name}"


def test_a_timed_run_records_shape_bytes_and_floor_ratios(tmp_path):
    out = tmp_path / "b.json"
    proc = _pytest("benchmarks/bench_kv_append.py", "--benchmark-only", f"--benchmark-json={out}", "-q",
                   NBP_BENCH_SMOKE="1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    floors = data["machine_info"]["nbp_floors"]
    assert floors["copy_bandwidth_bytes_per_s"] > 0 and floors["matmul_flops_per_s"] > 0
    benches = {b["name"]: b for b in data["benchmarks"]}
    assert "test_kv_append_[torch]" in benches and "test_kv_append_[reference]" in benches
    for b in benches.values():
        info = b["extra_info"]
        assert info["op"] == "kv_append_" and info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["bytes"] > 0 and info["shape"].startswith("B1 H2 S64 D32 L16")
        ratio = b["stats"]["median"] / (info["bytes"] / floors["copy_bandwidth_bytes_per_s"])
        assert abs(info["time_over_bytes_floor"] - ratio) <= 1e-6 * ratio
