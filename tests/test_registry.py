"""nbp_kernels.registry: resolution, per-op fallback, errors, forcing, the info table."""
import pytest
import torch

import nbp_kernels
from nbp_kernels import cpu_ops, decode_attention_cpu, packed_linear, registry, sample_cpu, torch_ops
from nbp_kernels import reference as ref_mod


def _attn(S=8, D=16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, S, D, generator=g) for _ in range(3)]


def test_auto_on_cpu_resolves_attention_to_the_cpu_kernels_and_append_to_torch():
    """...the prefill and decode attention run the cpu backend's C kernel where it compiles
    (float32), the append stays torch's."""
    assert registry.resolved_backend("kv_append_", device="cpu", dtype=torch.float32,
                                     head_dim=16) == "torch"
    assert registry.resolve("kv_append_", device="cpu", dtype=torch.float32) is torch_ops.kv_append_
    ok, _ = decode_attention_cpu.is_available()
    for op in ("block_causal_attention", "block_decode_attention"):
        fn = registry.resolve(op, device="cpu", dtype=torch.float32, head_dim=16)
        assert fn is getattr(decode_attention_cpu if ok else torch_ops, op)
        assert registry.resolve(op, device="cpu", dtype=torch.bfloat16) is getattr(torch_ops, op)


def test_resolve_is_memoised():
    a = registry.resolve("block_decode_attention", "reference", device="cpu", dtype=torch.float32,
                         head_dim=16, block_size=4)
    b = registry.resolve("block_decode_attention", "reference", device="cpu", dtype=torch.float32,
                         head_dim=16, block_size=4)
    assert a is b is ref_mod.block_decode_attention


def test_cpu_kernels_are_registered_with_torch_fallbacks():
    ok, _ = packed_linear.is_available()
    fn = registry.resolve("linear", device="cpu", dtype=torch.float32)
    assert (fn is cpu_ops.PackedLinears) == ok
    assert registry.resolve("linear", device="cpu", dtype=torch.bfloat16) is torch_ops.linear
    assert registry.resolve("linear", "torch", device="cpu") is torch_ops.linear
    if sample_cpu.is_available()[0]:
        assert registry.resolve("keep_threshold", device="cpu", dtype=torch.float32) is sample_cpu.keep_threshold
        assert registry.resolve("draw_kept", "cpu", device="cpu", dtype=torch.float32) is sample_cpu.draw_kept


def test_backend_without_the_op_falls_back_per_op():
    """cuda implements only the decode step and the append: block_causal_attention asked of
    cuda runs what auto picks for that op (on the CPU: the cpu kernel for float32 where it
    compiles, else torch; torch for bfloat16)."""
    ok, _ = decode_attention_cpu.is_available()
    assert registry.resolved_backend("block_causal_attention", "cuda", device="cpu") == (
        "cpu" if ok else "torch")
    assert registry.resolved_backend("block_causal_attention", "cuda", device="cpu",
                                     dtype=torch.bfloat16) == "torch"
    q, k, v = _attn()
    got = nbp_kernels.block_causal_attention(q, k, v, block_size=4, backend="cuda")
    want = ref_mod.block_causal_attention(q, k, v, block_size=4)
    torch.testing.assert_close(got, want)
    assert registry.resolved_backend("linear", "triton", device="cpu", dtype=torch.bfloat16) == "torch"


def test_forced_backend_that_cannot_run_raises_with_reason():
    q, _, _ = _attn(S=4, D=64)
    kc = torch.zeros(1, 2, 16, 64)
    lens = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run block_decode_attention.*CUDA device"):
        nbp_kernels.block_decode_attention(q, kc, kc.clone(), lens, backend="cuda")
    with pytest.raises(ValueError, match="backend: 'cpu' cannot run linear.*float32"):
        registry.resolve("linear", "cpu", device="cpu", dtype=torch.float16)


@pytest.mark.parametrize("kwargs, match", [
    (dict(op="matmul"), "op: expected one of"),
    (dict(op="linear", backend="mkl"), "backend: expected one of"),
    (dict(op="linear", backend=None), "backend: expected one of"),
])
def test_unknown_op_or_backend_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        registry.resolve(**kwargs)
    with pytest.raises(ValueError, match=match):
        registry.resolved_backend(**kwargs)


def test_public_ops_reject_unknown_backend():
    q, k, v = _attn()
    with pytest.raises(ValueError, match="backend: expected one of"):
        nbp_kernels.block_causal_attention(q, k, v, block_size=4, backend="cudnn")


def test_register_rejects_unknown_names():
    with pytest.raises(ValueError, match="op: expected one of"):
        registry.register("softmax", "torch", torch.softmax)
    with pytest.raises(ValueError, match="backend: expected one of"):
        registry.register("linear", "auto", torch_ops.linear)


def test_forced_overrides_auto_inside_the_context_only():
    before = registry.resolve("linear", device="cpu", dtype=torch.float32)
    with registry.forced(linear="torch", block_decode_attention="reference"):
        assert registry.resolve("linear", device="cpu", dtype=torch.float32) is torch_ops.linear
        assert registry.resolved_backend("block_decode_attention", device="cpu") == "reference"
        assert registry.resolved_backend("block_decode_attention", "torch", device="cpu") == "torch"
    assert registry.resolve("linear", device="cpu", dtype=torch.float32) is before
    with pytest.raises(ValueError, match="op: expected one of"), registry.forced(sampler="torch"):
        pass


def test_status_table_covers_every_op_and_backend():
    rows = registry.status_table("cpu")
    assert {(op, b) for op, b, _, _ in rows} == {(op, b) for op in registry.OPS for b in registry.BACKENDS}
    status = {(op, b): (ok, why) for op, b, ok, why in rows}
    assert status[("block_causal_attention", "torch")] == (True, "")
    ok, why = status[("block_causal_attention", "cuda")]
    assert not ok and "does not implement" in why
    ok, why = status[("block_decode_attention", "cuda")]
    assert not ok and "CUDA device" in why
    assert status[("linear", "cpu")][0] == packed_linear.is_available()[0]
    assert status[("block_decode_attention", "cpu")][0] == decode_attention_cpu.is_available()[0]
    assert registry.backends_for("block_decode_attention") == ["torch", "triton", "cuda", "reference",
                                                                "cpu"]


def test_info_prints_the_table(capsys):
    from nbp.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "block_decode_attention" in out and "keep_threshold" in out
    assert any("block_decode_attention" in ln and "cuda" in ln and "no (" in ln for ln in out.splitlines())
    assert not any("block_causal_attention" in ln and "cuda" in ln for ln in out.splitlines())


def test_generator_resolves_once_per_request(monkeypatch):
    """The decode loop calls the resolved functions; nothing is resolved per layer or step."""
    from nbp.config import TransformerConfig
    from nbp.generate import FastGenerator
    from nbp.model import NBPTransformer

    torch.manual_seed(0)
    model = NBPTransformer(TransformerConfig.from_preset("tiny")).eval()
    gen = FastGenerator(model, packed_linear=False)
    calls = []
    real = registry.resolve
    monkeypatch.setattr("nbp.runner.resolve", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cfg = model.config
    ids = torch.randint(cfg.video_offset, cfg.video_offset + cfg.codebook_size, (1, cfg.block_size))
    gen.generate_tokens(ids, 3 * cfg.block_size, do_sample=False)
    assert sorted(calls) == ["block_causal_attention", "block_decode_attention", "kv_append_"]


def test_backend_that_failed_to_import_is_not_silently_replaced(monkeypatch):
    """A forced backend whose module cannot be imported raises with the import error;
    auto skips it."""
    without = {op: {b: e for b, e in impls.items() if b != "triton"}
               for op, impls in registry._REGISTRY.items()}
    monkeypatch.setattr(registry, "_REGISTRY", without)
    monkeypatch.setitem(registry._IMPORT_ERRORS, "triton", "cannot import nbp_kernels.ops: boom")
    monkeypatch.setattr(registry, "_CACHE", {})
    with pytest.raises(ValueError, match="backend: 'triton' cannot run kv_append_.*boom"):
        registry.resolve("kv_append_", "triton", device="cpu")
    assert registry.backend_status("triton", "cpu") == (False, "cannot import nbp_kernels.ops: boom")
    assert registry.resolved_backend("kv_append_", device="cpu") == "torch"


def test_generator_rejects_an_unusable_backend_before_touching_the_model():
    from nbp.config import TransformerConfig
    from nbp.generate import FastGenerator
    from nbp.model import NBPTransformer

    model = NBPTransformer(TransformerConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="backend: 'cuda' cannot run"):
        FastGenerator(model, dtype=torch.bfloat16, backend="cuda")
    assert next(model.parameters()).dtype == torch.float32


def test_an_op_is_usable_by_its_own_check_not_its_backends(monkeypatch):
    """A backend with one usable op and one unusable op: resolve serves the first and refuses
    the second with that op's own reason (not 'usable because a sibling op is')."""
    ops = {op: dict(impls) for op, impls in registry._REGISTRY.items()}
    monkeypatch.setattr(registry, "_REGISTRY", ops)
    monkeypatch.setattr(registry, "_CACHE", {})
    ops["linear"]["cpu"] = registry._Impl(ops["linear"]["cpu"].impl,
                                          lambda device: (False, "linear kernel did not compile"),
                                          None)
    ops["keep_threshold"]["cpu"] = registry._Impl(ops["keep_threshold"]["cpu"].impl,
                                                  lambda device: (True, ""), None)
    assert registry.resolve("keep_threshold", "cpu", device="cpu") is not None
    with pytest.raises(ValueError, match="cannot run linear on cpu: linear kernel did not compile$"):
        registry.resolve("linear", "cpu", device="cpu")
    assert registry.resolved_backend("linear", device="cpu") == "torch"
