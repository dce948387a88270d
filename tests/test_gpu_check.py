"""The step logic of benchmarks/gpu_check.sh, dry-run on the CPU (GPU_CHECK_DRY_RUN=1).

Its first-contact mode must answer in order, give each step its own timeout,
carry on after a failed or timed-out step, respect the group's total budget
and write the summary as it goes. A stand-in for python (PYTHON=...) fails or
hangs on chosen steps; the real dry run (slow) runs every step's CPU variant.
"""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
FIRST_CONTACT = ["env", "cuda_build", "quick_tests", "generate_headline", "tuning"]


def _fake_python(tmp_path: Path, body: str) -> str:
    """A python stand-in: ``body`` (bash) runs first, then the real interpreter."""
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!/usr/bin/env bash\n{body}\nexec {sys.executable} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return str(fake)


def _run(tmp_path: Path, timeout: int, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    out = tmp_path / "out"
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full.update(OUT=str(out), GPU_CHECK_DRY_RUN="1", GPU_CHECK_STEPS="first-contact", OMP_NUM_THREADS="1",
                **env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=timeout)
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in (out / "gpu_check_summary.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| step")]
    return proc, rows


def test_failed_and_timed_out_steps_do_not_stop_the_rest(tmp_path):
    fake = _fake_python(tmp_path, 'case "$*" in *--collect-only*) exit 3 ;; *generate_table.py*) sleep 60 ;; esac')
    proc, rows = _run(tmp_path, 600, PYTHON=fake, GPU_CHECK_TIMEOUTS="env=300 generate_headline=2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert [r[0] for r in rows] == FIRST_CONTACT
    status = {r[0]: r[1] for r in rows}
    assert status["env"] == "ok" and status["cuda_build"] == "ok" and status["tuning"] == "ok"
    assert status["quick_tests"] == "FAILED (rc 3)"
    assert status["generate_headline"] == "FAILED (timeout after 2 s)"
    assert int(next(r[2] for r in rows if r[0] == "generate_headline")) < 15
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert log.index("===== step env") < log.index("===== step quick_tests") < log.index("===== step tuning")


def test_the_total_budget_caps_and_skips_steps(tmp_path):
    fake = _fake_python(tmp_path, "sleep 30")
    proc, rows = _run(tmp_path, 120, PYTHON=fake, GPU_CHECK_BUDGET_S="6")
    assert proc.returncode == 1
    status = {r[0]: r[1] for r in rows}
    assert status["env"].startswith("FAILED (timeout after")
    assert int(next(r[3] for r in rows if r[0] == "env")) <= 6
    assert all(status[s] == "SKIPPED (budget spent)" for s in FIRST_CONTACT[2:]), status


def test_unknown_step_is_refused(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, OUT=str(tmp_path), GPU_CHECK_STEPS="env nope"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown step nope" in proc.stderr


def test_header_states_each_steps_time_share():
    head = SCRIPT.read_text().split("set -uo pipefail")[0]
    for step, seconds in [("env", 30), ("cuda_build", 120), ("quick_tests", 90), ("generate_headline", 120),
                          ("tuning", 50)]:
        assert f"{step} {seconds} s" in " ".join(head.split()), step
        assert f"add_step {step} step_{step} {seconds}" in SCRIPT.read_text()


@pytest.mark.slow
def test_dry_run_of_first_contact(tmp_path):
    """Every step's CPU variant: the build skipped, the tests collected, the --tiny headline table."""
    # the timeouts are a GPU machine's; a loaded 2-core runner imports torch more slowly
    proc, rows = _run(tmp_path, 900, PYTHON=sys.executable, GPU_CHECK_BUDGET_S="0",
                      GPU_CHECK_TIMEOUTS="env=300 quick_tests=300 generate_headline=400")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(r[0], r[1]) for r in rows] == [(s, "ok") for s in FIRST_CONTACT]
    out = tmp_path / "out"
    assert len(list(out.glob("generate_*.md"))) == 1 and len(list(out.glob("generate_*.json"))) == 1
    assert len([p for p in out.iterdir() if p.is_file()]) <= 8
    assert "test_block_decode_attention" in (out / "gpu_check.log").read_text()
