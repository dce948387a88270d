"""NBPTransformer: published layout, mask semantics, config presets."""
import math

import pytest
import torch
import torch.nn.functional as F

from nbp import ConfigError, NBPTransformer, TransformerConfig
from nbp.model import call_module, linear_act
from nbp_kernels import packed_linear
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
    """A LinearFn with a fused GELU that records which path each call took."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, x):
        self.calls.append("linear")
        return module(x)

    def gelu(self, module, x):
        self.calls.append("gelu")
        return F.gelu(module(x))


def test_linear_act_fuses_only_the_exact_gelu():
    lin, x = torch.nn.Linear(8, 6), torch.randn(3, 8)
    for act, path in ((torch.nn.GELU(), "gelu"), (torch.nn.GELU(approximate="tanh"), "linear"),
                      (torch.nn.ReLU(), "linear")):
        fn = _FusingLinear()
        torch.testing.assert_close(linear_act(fn, lin, act, x), act(lin(x)))
        assert fn.calls == [path], act
    assert torch.equal(linear_act(call_module, lin, torch.nn.GELU(), x), F.gelu(lin(x)))


@pytest.mark.skipif(not packed_linear.is_available()[0], reason=packed_linear.is_available()[1])
@pytest.mark.parametrize("rows", [16, 40])   # a decode step (fused kernel), a prefill (BLAS + F.gelu)
def test_block_with_packed_linears_fuses_fc1_and_gelu(tiny, rows):
    """Block.forward with PackedLinears runs fc1 + GELU as one kernel call (no separate
    GELU) and computes what the module path computes."""
    from nbp_kernels.cpu_ops import PackedLinears

    blk = tiny.blocks[0]
    linears = PackedLinears(blk)
    fused = []
    gelu = linears.gelu
    linears.gelu = lambda m, x: fused.append(m) or gelu(m, x)
    x = torch.randn(1, rows, tiny.config.n_embd)
    attend = tiny.block_causal_attend(backend="reference")
    with torch.no_grad():
        got, want = blk(x, attend, 0, linears), blk(x, attend, 0)
    assert fused == [blk.mlp[0]]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


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
