"""The CPU flags of the commands: --threads (configure_threads), --weight-dtype, and the ISA
and threads lines of nbp info."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbp.cli import build_parser, main
from nbp_kernels.packed_linear import is_available

ROOT = Path(__file__).resolve().parents[1]


def check_act_dtype_cli(capsys, tmp_path, weight: str, acts: tuple[str, ...]) -> None:
    """--act-dtype on nbp bench and generate: acts[0] refused without --weight-dtype
    ``weight``, each of ``acts`` benched with it, acts[0] generating a file; torch's
    threads restored after."""
    bench = ["bench", "--preset", "tiny", "--repeats", "1", "--top-k", "10", "--device", "cpu",
             "--threads", "1"]
    before = torch.get_num_threads()
    try:
        assert main(bench + ["--act-dtype", acts[0]]) == 2
        assert f"act_dtype: torch.{acts[0]} activations need weight_dtype" in \
            capsys.readouterr().err
        for act in acts:
            assert main(bench + ["--weight-dtype", weight, "--act-dtype", act]) == 0
            assert f"stored {weight}, activations {act}" in capsys.readouterr().out
        out = tmp_path / f"{acts[0]}.gif"
        assert main(["generate", "--out", str(out), "--random", "--seed", "1", "--greedy",
                     "--weight-dtype", weight, "--act-dtype", acts[0], "--threads", "1"]) == 0
        assert out.stat().st_size > 0
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_info_names_the_isa_and_threads(capsys, monkeypatch):
    monkeypatch.setenv("NBP_CPU_ISA", "off")
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cpu_isa"] == {"isa": "off", "why": "NBP_CPU_ISA=off"}
    assert info["cpu_threads"]["threads"] == torch.get_num_threads()
    monkeypatch.delenv("NBP_CPU_ISA")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu_isa: " in out and "cpu_threads: " in out


def test_every_computing_command_takes_threads():
    parser = build_parser()
    argv = {"generate": [], "bench": [], "eval": [],
            "train tokenizer": ["--out", "x"], "train tokens": ["--tokenizer", "t", "--out", "x"],
            "train transformer": ["--tokens", "t", "--out", "x"]}
    for cmd, extra in argv.items():
        args = parser.parse_args([*cmd.split(), *extra, "--threads", "3"])
        assert args.threads == 3, cmd
    assert parser.parse_args(["eval"]).threads == 1   # the demo's small steps: 1 thread
    for cmd in ("generate", "bench"):
        assert parser.parse_args([cmd, "--weight-dtype", "int8"]).weight_dtype == "int8"
        assert parser.parse_args([cmd]).weight_dtype == "float32"
        assert parser.parse_args([cmd, "--act-dtype", "int8"]).act_dtype == "int8"
        assert parser.parse_args([cmd]).act_dtype == "float32"


@pytest.mark.usefixtures("keep_threads")
def test_bench_threads_and_int8_weights(capsys):
    assert main(["bench", "--preset", "tiny", "--repeats", "1", "--top-k", "10",
                 "--device", "cpu", "--threads", "1", "--weight-dtype", "int8"]) == (
        0 if is_available()[0] else 2)
    assert torch.get_num_threads() == 1
    captured = capsys.readouterr()
    if is_available()[0]:
        assert "stored int8" in captured.out and "nbp" in captured.out
    else:
        assert "weight_dtype" in captured.err


@pytest.mark.usefixtures("keep_threads")
@pytest.mark.parametrize("argv, match", [
    (["bench", "--preset", "tiny", "--threads", "0"], "--threads: expected a positive int, got 0"),
    (["generate", "--random", "--threads", "-2"], "--threads: expected a positive int, got -2"),
    (["generate", "--random", "--dtype", "bfloat16", "--weight-dtype", "int8"],
     "weight_dtype: torch.int8 weights need the packed CPU linear"),
])
def test_bad_cpu_flags_are_one_line_errors(argv, match, capsys, tmp_path):
    out = tmp_path / "x.gif"
    assert main([*argv, "--out", str(out)] if argv[0] == "generate" else argv) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_weight_dtype_flag_rejects_unknown_values(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--weight-dtype", "float16"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(not is_available()[0], reason="needs the packed CPU linear")
@pytest.mark.usefixtures("keep_threads")
def test_generate_with_int8_weights_writes_a_video(tmp_path, capsys):
    out = tmp_path / "int8.gif"
    assert main(["generate", "--out", str(out), "--random", "--seed", "1", "--greedy",
                 "--weight-dtype", "int8", "--threads", "1"]) == 0
    assert out.stat().st_size > 0


def test_importing_nbp_sets_a_wait_policy_before_torch():
    """nbp sets a short spin on an idle machine and sleeping waits on a busy one (unless
    either variable is set) when imported first; an explicit value wins."""
    from nbp._wait_policy import wait_policy_for

    code = ("import os, json, nbp, torch; from nbp._wait_policy import CHOICE; "
            "print(json.dumps([CHOICE and CHOICE[:2], {k: os.environ.get(k) for k in "
            "('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}]))")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = lambda e: json.loads(subprocess.run([sys.executable, "-c", code], env=e, cwd=ROOT,
                                              check=True, capture_output=True,
                                              text=True).stdout.strip())
    (busy, cores), got = run(env)
    assert {k: v for k, v in got.items() if v is not None} == wait_policy_for(busy, cores)
    assert run({**env, "OMP_WAIT_POLICY": "ACTIVE"})[1] == {"OMP_WAIT_POLICY": "ACTIVE",
                                                           "GOMP_SPINCOUNT": None}
    assert run({**env, "GOMP_SPINCOUNT": "7"})[1] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "7"}


def test_wait_policy_rule():
    from nbp._wait_policy import SPIN_COUNT, wait_policy_for

    assert wait_policy_for(0, 2) == {"GOMP_SPINCOUNT": SPIN_COUNT}
    assert wait_policy_for(1, 2) == {"OMP_WAIT_POLICY": "PASSIVE"}    # one core already busy
    assert wait_policy_for(20, 64) == {"GOMP_SPINCOUNT": SPIN_COUNT}
    assert wait_policy_for(None, 8) == {"OMP_WAIT_POLICY": "PASSIVE"}   # unknown: the safe one


def test_settled_runnable_waits_out_a_starting_process():
    """A count that drops to zero within the reads is an idle machine (a process that was
    only starting); one that stays up is a busy one; an idle first read costs no wait."""
    from nbp._wait_policy import settled_runnable

    def reader(counts):
        it = iter(counts)
        return lambda: next(it)
    assert settled_runnable(reader([1, 1, 0, 5]), reads=4, interval=0) == 0
    assert settled_runnable(reader([2, 1, 1, 1]), reads=4, interval=0) == 1
    assert settled_runnable(reader([0]), reads=4, interval=0) == 0      # one read only
    assert settled_runnable(reader([None] * 4), reads=4, interval=0) is None


def test_other_runnable_counts_a_busy_process():
    from nbp._wait_policy import other_runnable

    if not Path("/proc/loadavg").exists():
        pytest.skip("needs Linux's /proc/loadavg")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.5)
        assert max(other_runnable() for _ in range(20)) >= 1
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.usefixtures("keep_threads")
def test_eval_reports_each_weight_dtype(capsys):
    assert main(["eval", "--model", "demo", "--num-clips", "2", "--repeats", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["pred_psnr_nbp_float32"] == res["pred_psnr_nbp"]   # the same greedy tokens
    assert res["token_agreement_nbp_float32"] == 1.0 and res["pred_psnr_drop_nbp_float32"] == 0
    for w in ("bfloat16", "int8", "int8_a16", "int8_a8", "bfloat16_abf16") if is_available()[0] else ():
        assert 0 <= res[f"token_agreement_nbp_{w}"] <= 1
        assert res[f"pred_psnr_drop_nbp_{w}"] == pytest.approx(
            res["pred_psnr_nbp_float32"] - res[f"pred_psnr_nbp_{w}"])


def test_eval_weight_dtypes_without_the_kernel(monkeypatch):
    """Where the packed linear cannot run, only float32 is reported, with the reason."""
    from nbp.commands.eval import weight_dtype_rows
    from nbp.demo import NUM_COND_FRAMES, heldout_clips, load_demo
    from nbp_kernels import registry

    monkeypatch.setenv("NBP_CPU_ISA", "off")
    monkeypatch.setattr(registry, "_CACHE", {})   # resolved before, with the kernel usable
    video, labels = heldout_clips(1)
    truth = video[:, :, NUM_COND_FRAMES:NUM_COND_FRAMES + 12]
    res = weight_dtype_rows(load_demo(), video, labels, truth)
    assert set(res) == {"pred_psnr_nbp_float32", "token_agreement_nbp_float32",
                        "pred_psnr_drop_nbp_float32", "weight_dtypes"}
    assert "NBP_CPU_ISA=off" in res["weight_dtypes"]


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, torch.bfloat16),   # Zen 4, Cooper Lake
    ({"avx2", "fma", "amx_tile", "amx_bf16"}, torch.bfloat16),      # Sapphire Rapids
    ({"avx2", "fma", "avx512f", "avx512_vnni"}, torch.float32),     # bf16 emulated: slower
    (set(), torch.float32),
])
def test_tokenizer_dtype_auto_follows_native_bf16(flags, want, monkeypatch):
    from nbp import devices
    from nbp_kernels import cpu_build

    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: frozenset(flags))
    dtype, why = devices.tokenizer_dtype("auto", "cpu")
    assert dtype == want and why.startswith("auto: ")
    assert devices.tokenizer_dtype("auto", "cuda")[0] == torch.float32   # no device needed
    assert devices.tokenizer_dtype("float32", "cpu")[0] == torch.float32
    assert devices.tokenizer_dtype("bfloat16", "cpu")[0] == torch.bfloat16
    with pytest.raises(ValueError, match=r"--tokenizer-dtype: expected one of .* got 'float16'"):
        devices.tokenizer_dtype("float16", "cpu")


def test_tokenizer_dtype_flags_and_info(capsys):
    parser = build_parser()
    assert parser.parse_args(["generate"]).tokenizer_dtype == "auto"
    assert parser.parse_args(["eval"]).tokenizer_dtype == "float32"   # the model card's numbers
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--tokenizer-dtype", "float16"])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["info", "--json"]) == 0
    tok = json.loads(capsys.readouterr().out)["cpu_tokenizer_dtype"]
    assert tok["dtype"] in ("float32", "bfloat16") and tok["why"].startswith("auto: ")


@pytest.mark.usefixtures("keep_threads")
def test_generate_with_a_bfloat16_tokenizer_writes_a_video(tmp_path, capsys):
    """The demo with its tokenizer in bfloat16 (what auto picks on AVX512-BF16 / AMX CPUs)
    writes the same kind of video: decode returns float32 frames whatever the dtype."""
    out = tmp_path / "bf16.gif"
    assert main(["generate", "--out", str(out), "--seed", "1", "--tokenizer-dtype", "bfloat16",
                 "--threads", "1"]) == 0
    assert "tokenizer in bfloat16" in capsys.readouterr().out
    assert out.stat().st_size > 0
