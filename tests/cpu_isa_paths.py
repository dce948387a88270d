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
