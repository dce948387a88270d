"""The float32 prefill's oneDNN GEMM (nbp_kernels.prefill_gemm) against
nbp_kernels.reference.fused_linear, and PackedLinear's routing of prefill-sized
products to it or to the module's BLAS call."""
import json

import pytest
import torch
import torch.nn.functional as F

from nbp.cli import main
from nbp_kernels import prefill_gemm, reference
from nbp_kernels.packed_linear import MAX_ROWS, PackedLinear

needs_onednn = pytest.mark.skipif(not prefill_gemm.is_available()[0],
                                  reason=prefill_gemm.is_available()[1])
# float32 rounding of a K-term dot product (the reference is exact, in float64)
TOL = {"rtol": 1e-5, "atol": 2e-5}


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def route(monkeypatch):
    def force(name):
        monkeypatch.setenv(prefill_gemm.ENV, name)
    return force


def test_route_reads_the_environment(route):
    route("blas")
    assert prefill_gemm.route() == ("blas", f"{prefill_gemm.ENV}=blas")
    route("onednn")
    name, why = prefill_gemm.route()
    assert name == ("onednn" if prefill_gemm.is_available()[0] else "blas")
    assert why == (f"{prefill_gemm.ENV}=onednn" if name == "onednn"
                   else prefill_gemm.is_available()[1])
    route("mkl")
    with pytest.raises(ValueError, match="NBP_PREFILL_GEMM: expected onednn or blas, got 'mkl'"):
        prefill_gemm.route()


def test_default_route_is_x86_64_only(route, monkeypatch):
    """Unforced, another architecture keeps BLAS (oneDNN measured faster on x86-64 only);
    NBP_PREFILL_GEMM=onednn still takes it there."""
    monkeypatch.delenv(prefill_gemm.ENV, raising=False)
    monkeypatch.setattr(prefill_gemm.platform, "machine", lambda: "aarch64")
    assert prefill_gemm.route() == ("blas", "the default on x86-64 only, where it was measured "
                                    "faster; this is aarch64 (NBP_PREFILL_GEMM=onednn forces it)")
    route("onednn")
    assert prefill_gemm.route()[0] == ("onednn" if prefill_gemm.is_available()[0] else "blas")


AVX512_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"})


@pytest.fixture
def x86_cpu(monkeypatch):
    """An x86-64 machine with the given CPU flags, NBP_PREFILL_GEMM and oneDNN's caps unset."""
    def cpu(flags):
        monkeypatch.setattr(prefill_gemm.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(prefill_gemm.cpu_build, "cpu_flags", lambda: frozenset(flags))
    for name in (prefill_gemm.ENV, *prefill_gemm.ISA_CAPS):
        monkeypatch.delenv(name, raising=False)
    return cpu


def test_default_route_needs_avx512(x86_cpu, route):
    """Unforced, an AVX2-only CPU keeps BLAS (oneDNN's AVX2 kernels measured no faster);
    NBP_PREFILL_GEMM=onednn still takes oneDNN there."""
    x86_cpu({"avx2", "fma", "avx512f"})
    assert prefill_gemm.route() == (
        "blas", "oneDNN was measured faster with AVX-512 only; this CPU lacks avx512bw, "
                "avx512dq, avx512vl (NBP_PREFILL_GEMM=onednn forces it)")
    route("onednn")
    assert prefill_gemm.route()[0] == ("onednn" if prefill_gemm.is_available()[0] else "blas")


def test_default_route_without_cpu_flags_is_blas(x86_cpu):
    """Where the flags cannot be read (no /proc/cpuinfo) the default is BLAS, saying why."""
    x86_cpu(())
    assert prefill_gemm.route() == (
        "blas", "oneDNN was measured faster with AVX-512 only; this CPU's flags are unknown "
                "(no /proc/cpuinfo) (NBP_PREFILL_GEMM=onednn forces it)")


@pytest.mark.parametrize("name", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
@pytest.mark.parametrize("cap,below", [("AVX2", True), ("avx2_vnni", True), ("SSE41", True),
                                       ("AVX", True), ("AVX512_CORE", False),
                                       ("AVX512_CORE_AMX", False), ("AVX10_1_512", False),
                                       ("ALL", False), ("", False)])
def test_default_route_follows_onednns_isa_cap(x86_cpu, monkeypatch, name, cap, below):
    """oneDNN held below AVX-512 by its environment variable counts as a CPU without it."""
    x86_cpu(AVX512_FLAGS)
    monkeypatch.setenv(name, cap)
    if below:
        assert prefill_gemm.route() == (
            "blas", f"oneDNN was measured faster with AVX-512 only; {name}={cap.upper()} holds "
                    f"oneDNN below it (NBP_PREFILL_GEMM=onednn forces it)")
    else:
        assert prefill_gemm.route()[0] == ("onednn" if prefill_gemm.is_available()[0]
                                           else "blas")


def test_unavailable_onednn_is_reported_and_not_used(route, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    prefill_gemm.is_available.cache_clear()
    try:
        assert prefill_gemm.is_available() == (False, "this torch is built without oneDNN (mkldnn)")
        route("onednn")
        assert prefill_gemm.route()[0] == "blas"
        lin = torch.nn.Linear(24, 40)
        pl, x = PackedLinear(lin), _rand(MAX_ROWS + 1, 24)
        with torch.no_grad():
            assert torch.equal(pl(x), lin(x))
    finally:
        prefill_gemm.is_available.cache_clear()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
@pytest.mark.parametrize("broken,why", [
    ("raises", "torch's oneDNN linear failed: no kernel for this CPU"),
    ("wrong", "torch's oneDNN linear disagrees with F.linear")])
def test_a_broken_onednn_is_reported_and_not_used(route, monkeypatch, broken, why):
    def linear(x, w, b, act, residual):
        if broken == "raises":
            raise RuntimeError("no kernel for this CPU\nsecond line")
        return torch.zeros(x.shape[0], w.shape[0])
    monkeypatch.setattr(prefill_gemm, "linear", linear)
    prefill_gemm.is_available.cache_clear()
    try:
        route("onednn")
        assert prefill_gemm.is_available() == (False, why)
        assert prefill_gemm.route() == ("blas", why)
    finally:
        prefill_gemm.is_available.cache_clear()


@pytest.fixture
def onednn_calls(monkeypatch):
    """The x of every prefill_gemm.linear call from now on (the function still runs)."""
    prefill_gemm.is_available()   # its check's own call made before, not recorded
    calls, linear = [], prefill_gemm.linear

    def recorded(x, *args):
        calls.append(x)
        return linear(x, *args)
    monkeypatch.setattr(prefill_gemm, "linear", recorded)
    return calls


@needs_onednn
@pytest.mark.parametrize("rows,K,N", [(33, 64, 50), (100, 96, 96), (513, 383, 129),
                                      (40, 1, 17)])
@pytest.mark.parametrize("act", [None, "gelu"])
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True),
                                           (False, True)])
def test_onednn_linear_matches_the_reference(rows, K, N, act, bias, residual):
    """act(x @ W.T + b) + r over odd sizes (K 383 and 1, N not a multiple of 16), with and
    without bias, GELU (fused, exact erf) and residual (fused add without a GELU)."""
    x, w = _rand(2, rows, K, seed=1), _rand(N, K, seed=2) / K ** 0.5
    b = _rand(N, seed=3) if bias else None
    r = _rand(2, rows, N, seed=4) if residual else None
    r0 = None if r is None else r.clone()
    got = prefill_gemm.linear(x, w, b, act, r)
    assert r is None or torch.equal(r, r0)   # the add's post-op writes a new tensor
    want = reference.fused_linear(x.double(), w.double(), None if b is None else b.double(),
                                  act=act, residual=None if r is None else r.double())
    assert got.dtype == torch.float32 and got.shape == (2, rows, N)
    torch.testing.assert_close(got.double(), want, **TOL)


@needs_onednn
def test_onednn_linear_of_strided_inputs():
    """A transposed weight and a sliced x are made contiguous, not misread."""
    w, x = _rand(48, 70, seed=1).t(), _rand(80, 96, seed=2)[:, ::2]
    torch.testing.assert_close(prefill_gemm.linear(x, w, None, None, None), x @ w.t(),
                               rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("act", [None, "gelu"])
def test_packed_linear_routes_prefills_to_onednn(route, onednn_calls, act):
    """More than MAX_ROWS rows of float32 weights: oneDNN, LayerNorm first and GELU /
    residual fused, within float32 rounding of the reference; MAX_ROWS rows stay on
    the packed kernel."""
    route("onednn")
    lin = torch.nn.Linear(64, 50)
    pl = PackedLinear(lin)
    n = (_rand(64, seed=5), _rand(64, seed=6), 1e-5)
    with torch.no_grad():
        pl(_rand(MAX_ROWS, 64))
        assert onednn_calls == []
        for rows in (MAX_ROWS + 1, 300):
            x, r = _rand(1, rows, 64, seed=rows), _rand(1, rows, 50, seed=rows + 1)
            got = pl(x, act=act, norm=n, residual=r)
            want = reference.fused_linear(x.double(), lin.weight.double(), lin.bias.double(),
                                          norm=n, act=act, residual=r.double())
            torch.testing.assert_close(got.double(), want, **TOL)
    assert [tuple(c.shape) for c in onednn_calls] == [(1, MAX_ROWS + 1, 64), (1, 300, 64)]


def test_blas_route_is_the_module_bit_for_bit(route, onednn_calls):
    """NBP_PREFILL_GEMM=blas: a prefill is the module's own forward, then torch's GELU."""
    route("blas")
    lin = torch.nn.Linear(384, 50)
    pl = PackedLinear(lin)
    with torch.no_grad():
        x = _rand(MAX_ROWS + 1, 384, seed=1)
        assert torch.equal(pl(x, act="gelu"), F.gelu(lin(x)))
    assert onednn_calls == []


@needs_onednn
def test_autograd_takes_the_blas_route(route, onednn_calls):
    """The oneDNN op has no backward: with gradients wanted, the module computes it."""
    route("onednn")
    lin = torch.nn.Linear(16, 8)
    pl = PackedLinear(lin)
    x = _rand(MAX_ROWS + 1, 16).requires_grad_()
    pl(x).sum().backward()
    assert onednn_calls == []
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand_as(x))


@pytest.mark.parametrize("name", ["onednn", "blas"])
def test_info_names_the_prefill_route(capsys, route, name):
    route(name)
    want = prefill_gemm.route()
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prefill_gemm"] == {"route": want[0],
                                                                   "why": want[1]}
    assert main(["info"]) == 0
    assert f"prefill_gemm: {want[0]} (float32 CPU prefill linears: {want[1]})" in \
        capsys.readouterr().out
