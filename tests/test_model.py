"""NBPTransformer: published layout, mask semantics, config presets."""
import math

import pytest
import torch
import torch.nn.functional as F

from nbp import ConfigError, NBPTransformer, TransformerConfig
from nbp.model import call_module, linear_fused, linear_many
from nbp_kernels import packed_linear
from nbp_kernels import reference as nbp_kernels_reference
from nbp_kernels.reference import nbp_mask


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return NBPTransformer(TransformerConfig.from_preset("tiny")).eval()


def test_state_dict_has_the_published_names_and_shapes(tiny):
    cfg, sd = tiny.config, tiny.state_dict()
    C, V = cfg.n_embd, cfg.vocab_size
    expect = {"tok_emb.weight": (V, C), "pos_emb": (1, cfg.max_seq_len, C), "head.weight": (V, C),
              "ln_f.weight": (C,), "uncond_embedding": (cfg.cond_len, C),
              "blocks.0.attn.query.weight": (C, C), "blocks.0.attn.key.bias": (C,),
              "blocks.0.attn.proj.weight": (C, C), "blocks.1.mlp.0.weight": (4 * C, C),
              "blocks.1.mlp.2.weight": (C, 4 * C), "blocks.1.ln2.bias": (C,)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "head.bias" not in sd
    per_block = {k.split(".", 2)[2] for k in sd if k.startswith("blocks.0.")}
    assert len(per_block) == 16  # ln1, ln2 (2 each), q/k/v/proj (2 each), mlp.0, mlp.2 (2 each)


def _published_forward(model, ids, mask):
    """The published minGPT forward, spelled out with explicit ops on our weights."""
    x = model.tok_emb.weight[ids] + model.pos_emb[:, :ids.shape[1]]
    H = model.config.n_head
    for blk in model.blocks:
        h = F.layer_norm(x, x.shape[-1:], blk.ln1.weight, blk.ln1.bias)
        B, T, C = h.shape
        q, k, v = (F.linear(h, m.weight, m.bias).view(B, T, H, C // H).transpose(1, 2)
                   for m in (blk.attn.query, blk.attn.key, blk.attn.value))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + F.linear(y, blk.attn.proj.weight, blk.attn.proj.bias)
        h = F.layer_norm(x, x.shape[-1:], blk.ln2.weight, blk.ln2.bias)
        x = x + F.linear(F.gelu(F.linear(h, blk.mlp[0].weight, blk.mlp[0].bias)),
                         blk.mlp[2].weight, blk.mlp[2].bias)
    x = F.layer_norm(x, x.shape[-1:], model.ln_f.weight, model.ln_f.bias)
    return x @ model.head.weight.T


@pytest.mark.parametrize("hybrid,cond_len", [(False, 0), (False, 3), (True, 3)])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_forward_equals_published_formulation(tiny, hybrid, cond_len, backend):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 19))
    mask = nbp_mask(19, block_size=4, cond_len=cond_len, hybrid=hybrid)
    got = tiny(ids, cond_len, hybrid=hybrid, backend=backend)
    torch.testing.assert_close(got, _published_forward(tiny, ids, mask), rtol=1e-4, atol=1e-4)


class _FusingLinear:
    """A LinearFn with ``fused`` and ``many`` methods (the torch composition) that records
    which path each call took."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, x):
        self.calls.append("linear")
        return module(x)

    def fused(self, module, x, norm=None, act=None, residual=None):
        self.calls.append(("fused", norm is not None, act, residual is not None))
        y = module(x if norm is None else norm(x))
        y = y if act is None else F.gelu(y)
        return y if residual is None else residual + y

    def many(self, modules, x, norm=None):
        self.calls.append(("many", norm is not None))
        return tuple(m(x if norm is None else norm(x)) for m in modules)


def test_linear_fused_fuses_only_what_the_kernels_compute():
    lin, x, r = torch.nn.Linear(8, 6), torch.randn(3, 8), torch.randn(3, 6)
    ln, ln_plain = torch.nn.LayerNorm(8), torch.nn.LayerNorm(8, elementwise_affine=False)
    drop, drop_on = torch.nn.Dropout(0.5).eval(), torch.nn.Dropout(0.5).train()
    cases = [({"act": torch.nn.GELU()}, ("fused", False, "gelu", False)),
             ({"norm": ln, "residual": r}, ("fused", True, None, True)),
             ({"norm": ln_plain, "act": torch.nn.GELU(), "drop": drop},
              ("fused", True, "gelu", False)),
             ({"residual": r, "drop": torch.nn.Dropout(0.0).train()}, ("fused", False, None, True)),
             ({"act": torch.nn.GELU(approximate="tanh")}, "linear"),
             ({"act": torch.nn.ReLU()}, "linear"),
             ({"norm": torch.nn.RMSNorm(8)}, "linear")]
    for kw, path in cases:
        fn = _FusingLinear()
        want = lin(kw["norm"](x) if "norm" in kw else x)
        want = kw["act"](want) if "act" in kw else want
        want = want + kw["residual"] if "residual" in kw else want
        torch.testing.assert_close(linear_fused(fn, lin, x, **kw), want)
        assert fn.calls == [path], kw
    fn = _FusingLinear()   # an active dropout is the module's, with its random mask
    torch.manual_seed(1)
    got = linear_fused(fn, lin, x, residual=r, drop=drop_on)
    torch.manual_seed(1)
    assert fn.calls == ["linear"] and torch.equal(got, r + drop_on(lin(x)))
    got = linear_fused(call_module, lin, x, norm=ln, act=torch.nn.GELU(), residual=r)
    assert torch.equal(got, r + F.gelu(lin(ln(x))))


def test_linear_many_passes_the_norm_to_many():
    mods, x = (torch.nn.Linear(8, 6), torch.nn.Linear(8, 2)), torch.randn(3, 8)
    ln = torch.nn.LayerNorm(8)
    fn = _FusingLinear()
    got = linear_many(fn, mods, x, norm=ln)
    assert fn.calls == [("many", True)]
    assert all(torch.equal(g, m(ln(x))) for g, m in zip(got, mods))
    fn = _FusingLinear()
    got = linear_many(fn, mods, x, norm=torch.nn.RMSNorm(8))
    assert fn.calls == [("many", False)]
    assert all(torch.equal(g, m(torch.nn.RMSNorm(8)(x))) for g, m in zip(got, mods))
    got = linear_many(call_module, mods, x, norm=ln)
    assert all(torch.equal(g, m(ln(x))) for g, m in zip(got, mods))


def test_block_call_module_path_is_the_published_composition(tiny):
    """The call_module path runs the same torch ops in the same order as before fusion:
    bit for bit, also in training with dropout (same random masks)."""
    cfg = TransformerConfig.from_preset("tiny")
    cfg.dropout = 0.1
    torch.manual_seed(0)
    blk = NBPTransformer(cfg).blocks[0].train()
    x = torch.randn(2, 8, cfg.n_embd)
    attend = tiny.block_causal_attend(backend="reference")
    torch.manual_seed(3)
    got = blk(x, attend, 0)
    torch.manual_seed(3)
    a = blk.attn
    q, k, v = (a.split_heads(m(blk.ln1(x))) for m in a.qkv)
    y = attend(q, k, v, 0).transpose(1, 2).reshape(x.shape)
    h = x + a.resid_drop(a.proj(y))
    fc1, act, fc2, drop = blk.mlp
    assert torch.equal(got, h + drop(fc2(act(fc1(blk.ln2(h))))))


@pytest.mark.skipif(not packed_linear.is_available()[0], reason=packed_linear.is_available()[1])
@pytest.mark.parametrize("rows", [16, 40])  # decode step; prefill
@pytest.mark.parametrize("dtype", [None, torch.int8], ids=["fp32", "int8_a8"])
@pytest.mark.parametrize("route", ["onednn", "blas"])
def test_block_with_packed_linears_fuses_norms_and_residuals(tiny, rows, dtype, route,
                                                             monkeypatch):
    """Block.forward and logits with PackedLinears run every linear through ``fused`` or
    ``many`` (LayerNorms as prologues, GELU and residuals as epilogues) and compute what
    the module path computes; a prefill (float32 weights, > MAX_ROWS rows) on the BLAS
    route bit for bit (``prefill_gemm``)."""
    from nbp_kernels import prefill_gemm
    from nbp_kernels.cpu_ops import PackedLinears

    monkeypatch.setenv(prefill_gemm.ENV, route)

    blk = tiny.blocks[0]
    linears = PackedLinears(tiny, dtype, dtype)
    calls = []
    fused, many = linears.fused, linears.many
    def record_fused(m, x, **kw):
        calls.append((m, kw["norm"], kw["act"], kw["residual"] is not None))
        return fused(m, x, **kw)

    linears.fused = record_fused
    linears.many = lambda ms, x, **kw: calls.append((ms, kw["norm"])) or many(ms, x, **kw)
    x = torch.randn(1, rows, tiny.config.n_embd)
    attend = tiny.block_causal_attend(backend="reference")
    with torch.no_grad():
        got, want = blk(x, attend, 0, linears), blk(x, attend, 0)
        logits, want_logits = tiny.logits(x, linears), tiny.logits(x)
    assert calls == [(blk.attn.qkv, blk.ln1), (blk.attn.proj, None, None, True),
                     (blk.mlp[0], blk.ln2, "gelu", False), (blk.mlp[2], None, None, True),
                     (tiny.head, tiny.ln_f, None, False)]
    if rows > packed_linear.MAX_ROWS and dtype is None and route == "blas":
        assert torch.equal(got, want) and torch.equal(logits, want_logits)
    tol = 1e-4 if dtype is None else 5e-2   # int8 weights and activations: quantization error
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(logits, want_logits, rtol=tol, atol=tol)


@pytest.mark.parametrize("keep,cond_len,hybrid", [(1, 0, False), (4, 0, False), (5, 3, False),
                                                   (3, 3, True), (50, 0, False)])
def test_run_layers_keep_computes_only_the_last_positions(tiny, keep, cond_len, hybrid):
    """run_layers(keep=k): the last k positions of the full run (the last block computes only
    those: its attention gets the kept queries with every key), keys and values of every
    position handed to attend as before; keep >= S is the full run."""
    from nbp_kernels.torch_ops import last_rows_attention

    x = torch.randn(2, 21, tiny.config.n_embd)
    kw = dict(block_size=4, cond_len=cond_len, hybrid=hybrid)
    seen = []

    def attend(q, k, v, i):
        seen.append((i, q.shape[2], k.shape[2]))
        if q.shape[2] < k.shape[2]:
            return last_rows_attention(q, k, v, **kw)
        return nbp_kernels_reference.block_causal_attention(q, k, v, **kw)

    with torch.no_grad():
        full = tiny.run_layers(x, attend)
        seen.clear()
        got = tiny.run_layers(x, attend, keep=keep)
    n = min(keep, 21)
    last = len(tiny.blocks) - 1
    assert seen == [(i, n if i == last else 21, 21) for i in range(last + 1)]
    assert got.shape == (2, n, tiny.config.n_embd)
    torch.testing.assert_close(got, full[:, -n:], atol=1e-5, rtol=1e-5)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="keep"):
            tiny.run_layers(x, attend, keep=bad)


def test_block_mask_visibility(tiny):
    """Later blocks never influence earlier ones; tokens inside a block see each other."""
    ids = torch.randint(0, 64, (1, 16))
    base = tiny(ids)
    changed = ids.clone()
    changed[0, 9] = (ids[0, 9] + 1) % 64           # block 2 (positions 8..11)
    out = tiny(changed)
    torch.testing.assert_close(out[:, :8], base[:, :8])          # blocks 0, 1 untouched
    assert not torch.allclose(out[:, 8], base[:, 8])              # same block, earlier position
    ntp = tiny(changed, block_size=1)
    torch.testing.assert_close(ntp[:, :9], tiny(ids, block_size=1)[:, :9])


def test_prefix_embeddings_replace_the_condition(tiny):
    ids = torch.randint(0, 64, (2, 8))
    emb = torch.randn(3, tiny.config.n_embd)
    a = tiny.embed(ids, prefix_embeddings=emb)
    b = tiny.embed(torch.cat([torch.zeros(2, 3, dtype=torch.long), ids[:, 3:]], 1))
    torch.testing.assert_close(a[:, 3:], b[:, 3:])
    torch.testing.assert_close(a[:, :3], (emb + tiny.pos_emb[0, :3]).expand(2, -1, -1))


def test_forward_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match="input_ids"):
        tiny(torch.randn(2, 8))
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(torch.zeros(1, 129, dtype=torch.long))


def test_presets_and_config_round_trip(tmp_path):
    base = TransformerConfig.from_preset("k600-base")
    assert (base.n_layer, base.n_head, base.n_embd, base.block_size) == (24, 16, 1536, 16)
    assert base.head_dim == 96 and base.video_len == 1280
    ucf = TransformerConfig.from_preset("ucf-base")
    assert ucf.video_offset == 32000 + 16 and ucf.vocab_size - 64000 - 16 == 32000
    ucf.save(tmp_path / "c.json")
    assert TransformerConfig.load(tmp_path / "c.json") == ucf
    with pytest.raises(ConfigError, match="unknown transformer preset"):
        TransformerConfig.from_preset("k600-huge")
    with pytest.raises(ConfigError, match="does not tile"):
        TransformerConfig(block_shape=(2, 1, 16))
    with pytest.raises(ConfigError, match="divisible by n_head"):
        TransformerConfig(n_embd=100, n_head=16)
    with pytest.raises(ConfigError, match="unknown TransformerConfig fields"):
        TransformerConfig.from_dict({"n_layers": 3})
