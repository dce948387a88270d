"""Compile-at-first-use for the C kernels in ``nbp_kernels/cpu/`` (CPU decode path).

One portable C source per kernel (GCC vector extensions) is compiled once per
instruction set: ``avx512`` (AVX-512 F/BW/DQ/VL + FMA), ``avx2`` (AVX2 + FMA)
on x86-64, ``neon`` on AArch64, and last ``portable``: the NEON build's code (no
intrinsics, four float lanes) for the host's baseline (SSE2 on x86-64), the
fallback of a CPU without AVX2+FMA, and on x86 machines the tests' stand-in for an
AArch64 one. ``cpu_isa()`` picks the best one this CPU runs, or the one
``NBP_CPU_ISA=avx512|avx2|neon|portable|off`` names, and says why.

``load("packed_linear")`` compiles ``cpu/packed_linear.c`` for that ISA with
the system C compiler (``$CC``, default ``cc``; about a second) into
``$NBP_CACHE_DIR`` (default ``~/.cache/nbp``), named by a hash of the source,
compiler and flags, and opens it with ctypes. A cached library is used only if
its sidecar (``<lib>.sha256``: size and SHA-256, written after the library)
matches it; otherwise it is rebuilt, so a truncated or half-copied file is
never mapped (that killed the process with SIGBUS). Both files are written
atomically with the modes the umask gives.

The kernels use OpenMP: the process's OpenMP runtime is torch's (libgomp.so.1
is loaded with torch), so ``torch.set_num_threads`` applies to them too;
``configure_threads`` sets the count and the wait policy. Nothing here is
needed for correctness: callers fall back to torch when ``load`` says why not.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["load", "cpu_isa", "ISAS", "supported_isas", "configure_threads"]

SOURCES = Path(__file__).with_name("cpu")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# Per ISA: compiler flags, the /proc/cpuinfo flags it needs, and glibc's
# vector expf / erfcf (libmvec) for the sampler, the linears' GELU and the decode
# attention's softmax.
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "avx2": ["-mavx2", "-mfma"],
    "neon": [],
    "portable": [],
}
CPU_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "fma"),
    "avx2": ("avx2", "fma"),
    "neon": ("asimd",),
    "portable": (),
}
ISAS = {"x86_64": ("avx512", "avx2", "portable"), "aarch64": ("neon", "portable")}
PORTABLE_MARCH = {"x86_64": ["-march=x86-64"], "aarch64": ["-march=armv8-a"]}
LIBS = {name: ["-lmvec", "-lm"]
        for name in ("sample_cpu", "packed_linear", "int8_linear", "decode_attention")}
# libmvec is linked for the x86 ISAs only: the NEON (and portable) code calls libm's
# scalar functions lane by lane, and AArch64 glibc ships libmvec only from 2.38.
MVEC_ISAS = ("avx512", "avx2")
# int8_linear's float epilogue must round each operation as the reference does
KERNEL_FLAGS = {"int8_linear": ["-ffp-contract=off"]}
ENV = "NBP_CPU_ISA"


def _arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def supported_isas() -> tuple[str, ...]:
    """The ISAs this machine runs, best first (empty off Linux x86-64/AArch64)."""
    if platform.system() != "Linux":
        return ()
    flags = cpu_flags()
    return tuple(i for i in ISAS.get(_arch(), ()) if all(f in flags for f in CPU_FLAGS[i]))


def cpu_isa() -> tuple[str, str]:
    """(isa, reason): the kernels' instruction set here, ``"off"`` if none.

    ``NBP_CPU_ISA`` forces one (``avx512``, ``avx2``, ``neon``, ``portable`` or ``off``); a
    forced ISA this CPU lacks gives ``"off"`` (running it would be SIGILL).
    Raises ValueError for any other value of ``NBP_CPU_ISA``.
    """
    # Every kernel launch asks (the variable may change between calls): the
    # answer is memoised per value, building it cost ~25 us, a millisecond a step.
    return _cpu_isa(os.environ.get(ENV, ""))


@functools.lru_cache(maxsize=16)
def _cpu_isa(env: str) -> tuple[str, str]:
    forced = env.strip().lower()
    if forced and forced not in ("off", *ISA_FLAGS):
        raise ValueError(f"{ENV}: expected one of avx512, avx2, neon, portable, off; "
                         f"got {forced!r}")
    have = supported_isas()
    if forced == "off":
        return "off", f"{ENV}=off"
    if forced:
        if forced not in have:
            return "off", f"{ENV}={forced}, but this CPU lacks it (it runs: {', '.join(have) or 'none'})"
        return forced, f"{ENV}={forced} (this CPU runs: {', '.join(have)})"
    if not have:
        return "off", f"needs Linux on x86-64 or AArch64, this is {platform.system()} on {_arch()}"
    if have[0] == "portable":
        need = " or ".join("+".join(CPU_FLAGS[i]) for i in ISAS[_arch()] if i != "portable")
        return "portable", f"the portable build: this CPU lacks {need} ({ENV} overrides)"
    return have[0], f"best this CPU runs (of {', '.join(have)}; {ENV} overrides)"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, mode from the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _digest(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}\n"


def _verified(lib: Path) -> bool:
    """Whether ``lib`` is whole: its sidecar holds its size and hash."""
    try:
        return lib.with_name(lib.name + ".sha256").read_text() == _digest(lib)
    except (OSError, UnicodeDecodeError):
        return False


def compile_flags(name: str, isa: str) -> tuple[list[str], list[str]]:
    """(compiler flags, libraries) that build ``cpu/<name>.c`` for ``isa`` into a shared
    library (what ``load`` compiles; the cross-compile tests reuse them)."""
    cmd = [*FLAGS, *ISA_FLAGS[isa], *KERNEL_FLAGS.get(name, []), f"-DNBP_ISA_{isa.upper()}=1"]
    if isa == "portable":   # a compiler whose default is x86-64-v3 would emit AVX2 for it
        cmd += PORTABLE_MARCH.get(_arch(), [])
    return cmd, [f for f in LIBS.get(name, []) if f != "-lmvec" or isa in MVEC_ISAS]


def compile_c(src: Path, name: str, isa: str, out: Path, include: Path = SOURCES,
              cc: str | None = None) -> None:
    """Compiles ``src`` into the shared library ``out`` as ``cpu/<name>.c`` is built for
    ``isa`` (``compile_flags``), its headers from ``include`` (what ``load`` builds; the
    ablations' kernel revisions and register loops, which live elsewhere, too). Raises
    RuntimeError with the compiler's message if it fails."""
    cc = cc or os.environ.get("CC", "cc")
    cmd, libs = compile_flags(name, isa)
    try:
        subprocess.run([cc, *cmd, f"-I{include}", str(src), "-o", str(out), *libs], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling {Path(src).name} for {isa} with {cc} failed: "
                           f"{e.stderr.strip()[-500:]}") from None


def _compile(name: str, isa: str, cc: str) -> Path:
    """Path of the shared library for ``cpu/<name>.c`` on ``isa``, compiled now unless cached."""
    src = SOURCES / f"{name}.c"
    cmd, libs = compile_flags(name, isa)
    # The headers the sources include are part of what is compiled, hence of the key.
    code = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))
    tag = hashlib.sha256(code + " ".join([cc, *cmd, *libs]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{isa}-{tag}.so"
    if out.exists() and _verified(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}-build-") as tmpdir:
        tmp = Path(tmpdir) / out.name   # the linker gives it the umask's mode
        compile_c(src, name, isa, tmp, cc=cc)
        digest = _digest(tmp)
        os.replace(tmp, out)   # atomic: a concurrent process sees no file or a whole one
    _atomic_write(out.with_name(out.name + ".sha256"), digest.encode())   # after the library
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("NBP_CACHE_DIR") or Path.home() / ".cache" / "nbp")


@functools.lru_cache(maxsize=None)
def _load(name: str, isa: str) -> tuple[ctypes.CDLL | None, str]:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler {cc!r} on PATH (set $CC)"
    try:
        lib = ctypes.CDLL(str(_compile(name, isa, cc)))
    except (OSError, RuntimeError) as e:
        return None, str(e)
    lib.nbp_cpu_isa.restype = ctypes.c_char_p
    built = lib.nbp_cpu_isa().decode()
    if built != isa:   # the source's ISA macros and these flags disagree: a bug, not a CPU limit
        return None, f"{name} built for {isa!r} reports {built!r}"
    return lib, ""


def load(name: str, bind=None) -> tuple[ctypes.CDLL | None, str, str]:
    """(library or None, isa, reason): ``cpu/<name>.c`` for ``cpu_isa()``.

    reason says why the ISA was chosen, or why the library cannot be used.
    bind(lib) -> lib: declares the library's signatures (memoised by the caller).
    """
    isa, why = cpu_isa()
    if isa == "off":
        return None, isa, why
    lib, err = _load(name, isa)
    if lib is None:
        return None, isa, err
    return (lib if bind is None else bind(lib)), isa, why


def usable(name: str) -> tuple[bool, str]:
    """(usable, reason naming the ISA) of ``cpu/<name>.c``; compiles it on the first call."""
    lib, isa, why = load(name)
    return lib is not None, (f"{isa}: {why}" if lib is not None else why)


def _spin_waits() -> bool:
    """Whether OpenMP threads spin after a parallel region (libgomp's default), as the
    environment says (libgomp read it when torch loaded it)."""
    return (os.environ.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"
            and os.environ.get("GOMP_SPINCOUNT", "").strip() not in ("0",))


def configure_threads(threads: int | None = None) -> int:
    """Set the CPU threads (torch's and the kernels') for a busy or quiet machine.

    OpenMP worker threads spin-wait after each parallel region (libgomp's
    default), taking a shared core from the thread that still has work: on a
    busy 2-core machine 2 threads were hundreds of times slower than 1, and
    with ``OMP_WAIT_POLICY=PASSIVE`` (sleeping waits) 2 threads were as fast
    as 1 or faster (benchmarks/ablations/cpu_threads_under_load.py). libgomp
    reads the policy once, when torch loads it: ``import nbp`` chooses it
    (``nbp/_wait_policy.py``: a short spin when the cores are idle, sleeping
    waits when they are busy); here it is set to PASSIVE only if torch is not
    imported yet and nothing chose one. An explicit ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT`` is kept.

    threads: a positive int, or None: torch's default count with sleeping
    waits, and 1 thread when threads spin and the machine is busy (1-minute
    load average at or above the cores). Returns the thread count set.
    """
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise ValueError(f"threads: expected a positive int or None, got {threads!r}")
    if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    if threads is None:
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= (os.cpu_count() or 1)
        threads = 1 if _spin_waits() and busy else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads
