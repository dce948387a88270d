"""nbp_kernels.cpu_build: ISA choice (NBP_CPU_ISA) and the verified cache of compiled kernels."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from nbp_kernels import cpu_build

ISAS = cpu_build.supported_isas()
AUTO = ISAS[0] if ISAS else "off"   # cpu_isa's choice
needs_isa = pytest.mark.skipif(not ISAS, reason=f"no kernel ISA here: {cpu_build.cpu_isa()[1]}")


def test_isa_choice_follows_the_environment(monkeypatch):
    monkeypatch.delenv("NBP_CPU_ISA", raising=False)
    isa, why = cpu_build.cpu_isa()
    assert isa == AUTO and why
    monkeypatch.setenv("NBP_CPU_ISA", "off")
    assert cpu_build.cpu_isa() == ("off", "NBP_CPU_ISA=off")
    for forced in ISAS:
        monkeypatch.setenv("NBP_CPU_ISA", forced.upper())
        isa, why = cpu_build.cpu_isa()
        assert isa == forced and why.startswith(f"NBP_CPU_ISA={forced}")
    missing = [i for i in ("avx512", "avx2", "neon") if i not in ISAS]
    for forced in missing:   # running it would be SIGILL: refused with the reason
        monkeypatch.setenv("NBP_CPU_ISA", forced)
        isa, why = cpu_build.cpu_isa()
        assert isa == "off" and "lacks it" in why
    monkeypatch.setenv("NBP_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="NBP_CPU_ISA: expected one of avx512, avx2, neon, "
                                         "portable, off"):
        cpu_build.cpu_isa()


def test_portable_is_the_last_resort(monkeypatch):
    """A Linux CPU with none of the SIMD ISAs' flags gets the portable build, saying why;
    one with them never gets it unless forced."""
    if not ISAS:
        pytest.skip(cpu_build.cpu_isa()[1])
    monkeypatch.delenv("NBP_CPU_ISA", raising=False)
    assert ISAS[-1] == "portable" and cpu_build.cpu_isa()[0] == AUTO
    monkeypatch.setattr(cpu_build, "cpu_flags", lambda: frozenset())
    cpu_build._cpu_isa.cache_clear()
    try:
        assert cpu_build.supported_isas() == ("portable",)
        isa, why = cpu_build.cpu_isa()
        assert isa == "portable" and why.startswith("the portable build: this CPU lacks")
        monkeypatch.setenv("NBP_CPU_ISA", "avx2")   # flags it lacks: refused, never SIGILL
        assert cpu_build.cpu_isa()[0] == "off"
    finally:
        cpu_build._cpu_isa.cache_clear()


def test_off_disables_both_kernels(monkeypatch):
    from nbp_kernels import packed_linear, sample_cpu
    monkeypatch.setenv("NBP_CPU_ISA", "off")
    assert packed_linear.is_available() == (False, "NBP_CPU_ISA=off")
    assert sample_cpu.is_available() == (False, "NBP_CPU_ISA=off")


_RUN = """
import torch
from nbp_kernels import packed_linear as pl
ok, why = pl.is_available()
assert ok, why
w, x = torch.randn(40, 24), torch.randn(3, 24)
torch.testing.assert_close(pl.packed_linear(x, pl.pack_weight(w), None, 40), x @ w.T)
print("ran", why)
"""


def _run_in_subprocess(cache: Path, isa: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, NBP_CACHE_DIR=str(cache), NBP_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", _RUN], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])


def _built(cache: Path, isa: str) -> Path:
    (lib,) = cache.glob(f"packed_linear-{isa}-*.so")
    return lib


@needs_isa
@pytest.mark.parametrize("damage", ["truncate", "sidecar missing", "sidecar wrong"])
def test_a_damaged_cached_build_is_rebuilt(tmp_path, damage):
    """A truncated .so in the cache killed the next process with SIGBUS; now it is rebuilt."""
    isa = ISAS[0]
    first = _run_in_subprocess(tmp_path, isa)
    assert first.returncode == 0, first.stderr
    lib = _built(tmp_path, isa)
    sidecar = lib.with_name(lib.name + ".sha256")
    whole = lib.read_bytes()
    assert sidecar.read_text().split() == [str(len(whole)), hashlib.sha256(whole).hexdigest()]
    if damage == "truncate":
        lib.write_bytes(whole[: len(whole) // 2])
    elif damage == "sidecar missing":
        sidecar.unlink()
    else:
        sidecar.write_text("0 0\n")
    second = _run_in_subprocess(tmp_path, isa)
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])
    assert "ran" in second.stdout
    assert cpu_build._verified(lib) and lib.stat().st_size == len(whole)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp files left


@needs_isa
def test_cache_files_take_the_umask_modes(tmp_path):
    old = os.umask(0o027)
    try:
        r = _run_in_subprocess(tmp_path, ISAS[0])
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    lib = _built(tmp_path, ISAS[0])
    assert stat.S_IMODE(lib.with_name(lib.name + ".sha256").stat().st_mode) == 0o640
    assert stat.S_IMODE(lib.stat().st_mode) & 0o027 == 0


CROSS_CC = "aarch64-linux-gnu-gcc"
KERNELS = sorted(p.stem for p in cpu_build.SOURCES.glob("*.c"))
EM_AARCH64 = 183   # ELF e_machine


@pytest.mark.skipif(shutil.which(CROSS_CC) is None, reason=f"no {CROSS_CC} cross compiler here")
@pytest.mark.parametrize("name", KERNELS)
def test_neon_builds_compile_and_link(tmp_path, monkeypatch, name):
    """Every kernel compiles and links for AArch64 with the flags and libraries cpu_build
    uses there (not libmvec, which AArch64 glibc lacks before 2.38)."""
    monkeypatch.setenv("NBP_CACHE_DIR", str(tmp_path))
    lib = cpu_build._compile(name, "neon", CROSS_CC)
    assert lib.read_bytes()[:4] == b"\x7fELF" and cpu_build._verified(lib)


@functools.lru_cache(maxsize=1)
def _host_omp_include() -> Path | None:
    """The folder of the host GCC's omp.h (its declarations do not depend on the target)."""
    if shutil.which("gcc") is None:
        return None
    found = Path(subprocess.run(["gcc", "-print-file-name=include/omp.h"], capture_output=True,
                                text=True).stdout.strip())
    return found.parent if found.is_absolute() and found.exists() else None


@pytest.mark.skipif(importlib.util.find_spec("ziglang") is None or _host_omp_include() is None,
                    reason="no ziglang (pip install ziglang: clang with AArch64 glibc headers) "
                           "or no host omp.h")
@pytest.mark.parametrize("name", KERNELS)
def test_neon_builds_compile_with_clang(tmp_path, name):
    """Every kernel compiles for AArch64 Linux with a second compiler, clang (``zig cc``),
    with cpu_build's NEON flags, warnings as errors. An object only: no AArch64 OpenMP
    runtime here to link against."""
    flags, _ = cpu_build.compile_flags(name, "neon")
    out = tmp_path / f"{name}.o"
    r = subprocess.run([sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-linux-gnu",
                        *[f for f in flags if f != "-shared"], "-Wall", "-Wextra", "-Werror",
                        "-isystem", str(_host_omp_include()), "-c",
                        str(cpu_build.SOURCES / f"{name}.c"), "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    head = out.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_configure_threads_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="threads: expected a positive int or None"):
        cpu_build.configure_threads(bad)


def test_configure_threads_sets_torch_threads():
    import torch
    before = torch.get_num_threads()
    try:
        assert cpu_build.configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_configure_threads_default_follows_the_wait_policy(monkeypatch):
    """Spinning waits on a busy machine: 1 thread; sleeping waits: torch's default count."""
    import torch
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    try:
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        assert cpu_build.configure_threads() == 1
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        assert cpu_build.configure_threads() == before
    finally:
        torch.set_num_threads(before)


def test_configure_threads_sets_passive_waits_before_torch_loads():
    """In a fresh process, called before torch is imported: libgomp sees PASSIVE."""
    code = ("import os, sys, importlib.util\n"
            "spec = importlib.util.spec_from_file_location('cb', 'nbp_kernels/cpu_build.py')\n"
            "cb = importlib.util.module_from_spec(spec); spec.loader.exec_module(cb)\n"
            "assert 'torch' not in sys.modules\n"
            "cb.configure_threads(1)\n"
            "print(os.environ['OMP_WAIT_POLICY'])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "PASSIVE"


@pytest.mark.skipif(cpu_build._arch() != "x86_64" or shutil.which("objdump") is None
                    or "portable" not in ISAS, reason="needs x86-64 Linux with objdump")
@pytest.mark.parametrize("name", KERNELS)
def test_portable_build_keeps_to_the_x86_64_baseline(tmp_path, monkeypatch, name):
    """The portable build runs on a CPU without AVX: no VEX or EVEX instruction in it
    (their mnemonics start with v), whatever -march the compiler defaults to."""
    monkeypatch.setenv("NBP_CACHE_DIR", str(tmp_path))
    lib = cpu_build._compile(name, "portable", os.environ.get("CC", "cc"))
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], check=True,
                          capture_output=True, text=True).stdout
    mnemonics = [line.split("\t")[1].split()[0] for line in text.splitlines()
                 if ":\t" in line and line.split("\t")[1].strip()]
    assert mnemonics and not [m for m in mnemonics if m.startswith("v")]
