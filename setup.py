"""Plain install; the CUDA extension nbp_kernels._C is built only when asked.

``NBP_BUILD_CUDA=1 python setup.py build_ext --inplace`` (or
``NBP_BUILD_CUDA=1 pip install --no-build-isolation -e .``) compiles csrc/ with
nvcc through ninja (a plain subprocess loop if ninja is missing) and links it
with the host compiler against the static CUDA runtime, so the module needs
neither torch's C++ ABI nor a libcudart on the target machine. Without the
flag nothing is compiled and the package works on CPU alone.

Environment: ``NBP_CUDA_ARCHS`` (default ``80;90a``: SASS for each, plus PTX
of the newest plain arch for later GPUs), ``CUDA_HOME``, ``MAX_JOBS``.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CUDA_SOURCES = ["decode_attention.cu", "decode_mma.cu", "decode_simt.cu", "kv_append.cu"]
HOST_SOURCES = ["bindings.cpp"]
HEADERS = ["common.cuh", "nbp_ops.h"]


def _want_cuda() -> bool:
    return os.environ.get("NBP_BUILD_CUDA", "0").lower() in ("1", "true", "yes", "on")


def _cuda_home() -> Path:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else the first candidate
    that has bin/nvcc and lib64/libcudart_static.a (nvcc on PATH may be a wrapper)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    candidates = [Path("/usr/local/cuda")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, Path(nvcc).resolve().parent.parent)
    candidates += sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for c in candidates:
        if (c / "bin" / "nvcc").exists() and (c / "lib64" / "libcudart_static.a").exists():
            return c
    return candidates[0]


def _archs() -> list[str]:
    return [a.strip() for a in os.environ.get("NBP_CUDA_ARCHS", "80;90a").split(";") if a.strip()]


def _gencode(archs: list[str]) -> tuple[list[str], str]:
    """nvcc -gencode flags and the archs string compiled into the module."""
    flags, names = [], []
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        names.append(f"sm_{a}")
    # PTX for the newest arch (an "a" suffix dropped: arch-specific features
    # have no forward-compatible PTX), JIT-compiled by the driver on later GPUs.
    top = max((a.rstrip("a") for a in archs), key=int)
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    names.append(f"compute_{top}")
    return flags, ";".join(names)


class CudaBuildExt(build_ext):
    """Builds ``nbp_kernels._C`` with nvcc + host linker; other extensions as usual."""

    def build_extension(self, ext):
        if ext.name != "nbp_kernels._C":
            return super().build_extension(ext)
        try:
            import pybind11
        except ImportError as e:
            raise RuntimeError("building nbp_kernels._C needs pybind11 in the build environment "
                               "(pip install pybind11; with pip use --no-build-isolation)") from e
        cuda = _cuda_home()
        nvcc = cuda / "bin" / "nvcc"
        if not nvcc.exists():
            raise RuntimeError(f"NBP_BUILD_CUDA=1 but nvcc was not found at {nvcc} (set CUDA_HOME)")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        tmp = Path(self.build_temp).resolve() / "nbp_C"
        tmp.mkdir(parents=True, exist_ok=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        commands = self._commands(nvcc, cuda, pybind11.get_include(), tmp, out)
        ninja = shutil.which("ninja")
        if ninja:
            self._run_ninja(ninja, commands, tmp)
        else:
            for _, _, cmd in commands:
                print(cmd)
                subprocess.run(cmd, shell=True, check=True)

    @staticmethod
    def _commands(nvcc: Path, cuda: Path, pybind_inc: str, tmp: Path, out: Path):
        """[(output, inputs, shell command)] in build order; the last one links."""
        gencode, arch_names = _gencode(_archs())
        incs = [f"-I{CSRC}", f"-I{cuda / 'include'}"]
        nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "-Xcompiler=-fPIC", "-Xcompiler=-fvisibility=hidden",
                      f"-DNBP_ARCHS=\"{arch_names}\"", *gencode, *incs]
        cxx = os.environ.get("CXX", "c++")
        host_flags = ["-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden", f"-I{CSRC}",
                      f"-I{pybind_inc}", f"-I{sysconfig.get_paths()['include']}"]
        cmds, objs = [], []
        for src in CUDA_SOURCES + HOST_SOURCES:
            obj = tmp / (src + ".o")
            tool = [str(nvcc), *nvcc_flags] if src.endswith(".cu") else [cxx, *host_flags]
            cmd = " ".join(shlex.quote(x) for x in [*tool, "-c", str(CSRC / src), "-o", str(obj)])
            cmds.append((obj, [CSRC / src] + [CSRC / h for h in HEADERS], cmd))
            objs.append(obj)
        link = [cxx, "-shared", *map(str, objs), f"-L{cuda / 'lib64'}", "-lcudart_static", "-lrt",
                "-lpthread", "-ldl", "-o", str(out)]
        cmds.append((out, objs, " ".join(shlex.quote(x) for x in link)))
        return cmds

    def _run_ninja(self, ninja: str, commands, tmp: Path) -> None:
        def esc(p) -> str:
            return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

        lines = ["ninja_required_version = 1.3", ""]
        for i, (output, inputs, cmd) in enumerate(commands):
            lines += [f"rule r{i}", f"  command = {cmd.replace('$', '$$')}", f"  description = {Path(output).name}",
                      f"build {esc(output)}: r{i} " + " ".join(esc(x) for x in inputs), ""]
        (tmp / "build.ninja").write_text("\n".join(lines))
        jobs = os.environ.get("MAX_JOBS", "2")
        subprocess.run([ninja, "-C", str(tmp), "-j", jobs], check=True)


ext_modules = []
if _want_cuda():
    ext_modules.append(Extension("nbp_kernels._C",
                                 sources=[f"csrc/{s}" for s in CUDA_SOURCES + HOST_SOURCES]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CudaBuildExt})
