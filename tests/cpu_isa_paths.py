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


def feature_paths(cpu_flags_of: dict[str, str], name: str) -> list:
    """Parameters (NBP_CPU_ISA, the feature's environment value, the path that must run) of
    a kernel with optional extensions: ``cpu_flags_of`` maps an ISA to the /proc/cpuinfo
    flag of its extension, whose path is ``<isa>-<name>``. Every ISA this machine runs, and
    for each whose extension the CPU has, that ISA with the extension turned off too."""
    from nbp_kernels.cpu_build import cpu_flags

    have = cpu_flags()
    paths = [(isa, None, f"{isa}-{name}" if cpu_flags_of.get(isa) in have else isa)
             for isa in supported_isas()]
    paths += [(isa, "off", isa) for isa, _, path in paths if path != isa]
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
