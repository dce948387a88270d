"""The CPU ISA paths of the C kernels' tests: every ISA this machine runs, each forced in turn
with ``NBP_CPU_ISA`` (an AVX-512 machine tests the AVX2 path too)."""
import pytest

from nbp_kernels.cpu_build import cpu_isa, supported_isas

# a machine that runs none (no compiler, another architecture) skips, saying why
ISAS = supported_isas() or [pytest.param("none", marks=pytest.mark.skip(reason=cpu_isa()[1]))]


def force_isa(monkeypatch, isa: str, is_available, *args, **kwargs) -> str:
    """``isa`` forced for one test; the kernel's ``is_available(*args, **kwargs)`` must then
    build for it: a supported ISA whose kernel does not build is a failure, not a skip."""
    monkeypatch.setenv("NBP_CPU_ISA", isa)
    ok, why = is_available(*args, **kwargs)
    assert ok, why
    assert why.startswith(f"{isa}:")
    return isa


def feature_paths(cpu_flag: str, name: str) -> list:
    """Parameters (NBP_CPU_ISA, the feature's environment value, the path that must run) of
    a kernel with an optional AVX-512 extension (``cpu_flag`` in /proc/cpuinfo, its path
    ``avx512-<name>``): every ISA this machine runs, and where the CPU has the extension,
    the avx512 build with it turned off too."""
    from nbp_kernels.cpu_build import cpu_flags

    ext = f"avx512-{name}"
    paths = [(isa, None, ext if isa == "avx512" and cpu_flag in cpu_flags() else isa)
             for isa in supported_isas()]
    paths += [("avx512", "off", "avx512") for *_, path in paths if path == ext]
    return [pytest.param(p, id=p[2] if p[1] is None else f"{p[2]}-no{name}") for p in paths] or [
        pytest.param(None, marks=pytest.mark.skip(reason=cpu_isa()[1]))]


def force_path(monkeypatch, param: tuple, env: str, is_available, path) -> str:
    """One of ``feature_paths``' parameters forced for a test (``env``: the feature's
    variable); the kernel must build and ``path()`` name the expected path."""
    isa, value, want = param
    monkeypatch.setenv("NBP_CPU_ISA", isa)
    if value is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, value)
    ok, why = is_available()
    assert ok, why   # a path this CPU runs whose kernel does not build is a failure
    assert path() == want
    return want
