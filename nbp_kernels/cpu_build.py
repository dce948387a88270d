"""Compile-at-first-use for the C kernels in ``nbp_kernels/cpu/`` (CPU decode path).

``load("packed_linear")`` compiles ``cpu/packed_linear.c`` with the system C
compiler (``$CC``, default ``cc``; about a second) into ``$NBP_CACHE_DIR``
(default ``~/.cache/nbp``), named by a hash of the source and flags and
written atomically, and opens it with ctypes. The kernels use AVX-512F and
OpenMP: the process's OpenMP runtime is torch's (libgomp.so.1 is loaded with
torch), so ``torch.set_num_threads`` applies to them too. Nothing here is
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
import tempfile
from pathlib import Path

__all__ = ["load"]

SOURCES = Path(__file__).with_name("cpu")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
LIBS = {"sample_cpu": ["-lmvec"]}   # glibc's vector math (expf on 16 lanes)


def _cache_dir() -> Path:
    return Path(os.environ.get("NBP_CACHE_DIR") or Path.home() / ".cache" / "nbp")


def _compile(name: str, cc: str) -> Path:
    """Path of the shared library for ``cpu/<name>.c``, compiled now unless cached."""
    src = SOURCES / f"{name}.c"
    libs = LIBS.get(name, [])
    tag = hashlib.sha256(src.read_bytes() + " ".join([cc, *FLAGS, *libs]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(src), "-o", tmp, *libs], check=True,
                       capture_output=True, text=True)
        os.replace(tmp, out)   # atomic: a concurrent process sees no file or a whole one
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling {src.name} with {cc} failed: {e.stderr.strip()[-500:]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=None)
def load(name: str) -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why ``cpu/<name>.c`` cannot be used on this machine)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs Linux on x86-64, this is {platform.system()} on {platform.machine()}"
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None, f"no C compiler {cc!r} on PATH (set $CC)"
    try:
        lib = ctypes.CDLL(str(_compile(name, cc)))
    except (OSError, RuntimeError) as e:
        return None, str(e)
    if not lib.nbp_cpu_supported():   # every cpu/*.c says whether this CPU can run it
        return None, "this CPU lacks AVX-512F/FMA"
    return lib, ""
