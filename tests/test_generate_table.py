"""Smoke run of benchmarks/generate_table.py --tiny: every code path of the GPU
table (decode-step timing, floor bytes, NBP/NTP frame prediction, the whole job
with the tokenizer, markdown and JSON) on the tiny preset, on this machine."""
import json
import os
import subprocess
import sys
from pathlib import Path

from nbp.config import TransformerConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_table.py"


def test_tiny_table(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")   # oversubscribed threads are 10x slower here
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (md,) = tmp_path.glob("generate_*.md")
    (js,) = tmp_path.glob("generate_*.json")
    assert md.read_text() in proc.stdout
    result = json.loads(js.read_text())
    cfg = TransformerConfig.from_preset("tiny")
    # on CUDA the usable explicit backends get rows too
    assert [r["batch"] for r in result["decode"] if r["backend"] == "auto"] == [1, 2]
    for r in result["decode"]:
        assert r["cached"] == 48 and r["tokens_per_step"] == cfg.block_size
        kv = 2 * cfg.n_layer * r["batch"] * cfg.n_head * r["cached"] * cfg.head_dim * 4
        assert r["bytes"]["kv_cache"] == kv
        assert r["bytes"]["total"] == r["bytes"]["weights"] + r["bytes"]["embedding_rows"] + kv
        assert r["sampled_ms"] > 0 and r["greedy_ms"] > 0 and r["floor_ms"] > 0
    ar, job = result["autoregressive"], result["job"]
    assert ar["nbp"]["steps"] == 16 // cfg.block_size and ar["ntp"]["steps"] == 16
    assert job["given_frames"] == 5 and job["decoded_frames"] == 9 and job["new_frames"] == 4
    for row in (ar["nbp"], ar["ntp"], job["nbp"], job["ntp"]):
        assert abs(row["frames_per_s"] * row["seconds"] - 4) < 1e-9
    assert [v["status"] for v in result["verdicts"]] == ["n/a (--tiny)"] * 4
