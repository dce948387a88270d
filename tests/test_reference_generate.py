"""nbp.reference.generate_tokens: the published step semantics, checked step by step."""
import pytest
import torch

from nbp import NBPTransformer, TransformerConfig
from nbp.reference import generate_tokens


def _model(preset):
    torch.manual_seed(0)
    return NBPTransformer(TransformerConfig.from_preset(preset)).eval()


class Recorder(torch.nn.Module):
    """Wraps a model and records the id sequences and mask settings of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.config, self.uncond_embedding = model.config, model.uncond_embedding

    def forward(self, ids, cond_len=0, **kw):
        self.calls.append((ids.clone(), cond_len, kw))
        return self.model(ids, cond_len, **kw)


def test_greedy_nbp_is_argmax_of_last_block_each_step():
    m = _model("tiny")
    prefix = torch.randint(0, 64, (2, 8))
    out = generate_tokens(m, prefix, 12, do_sample=False)
    assert out.shape == (2, 12) and out.dtype == torch.int64
    seq = prefix
    for _ in range(3):  # position p predicts p + L: the last L logits give the next block
        nxt = m(seq)[:, -4:].argmax(-1)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq[:, 8:])
    assert torch.equal(out, generate_tokens(m, prefix, 12, do_sample=False))


def test_ntp_mode_runs_one_token_per_step_with_a_causal_mask():
    rec = Recorder(_model("tiny"))
    out = generate_tokens(rec, torch.randint(0, 64, (1, 5)), 6, mode="ntp", do_sample=False)
    assert out.shape == (1, 6) and len(rec.calls) == 6
    assert all(kw["block_size"] == 1 and not kw["hybrid"] for _, _, kw in rec.calls)
    assert [c[0].shape[1] for c in rec.calls] == [5, 6, 7, 8, 9, 10]


def test_hybrid_layout_step_by_step():
    m = _model("tiny-hybrid")
    L = m.config.block_size
    cond = torch.tensor([[4, 5, 6], [7, 8, 9]])
    ids = torch.cat([cond, torch.zeros(2, 1, dtype=torch.long)], 1)   # condition + bov
    rec = Recorder(m)
    out = generate_tokens(rec, ids, 12, cond_len=3, mode="hybrid", do_sample=False)
    assert out.shape == (2, 12)
    # L single-token steps, then (12 - L) / L block steps
    assert len(rec.calls) == L + (12 - L) // L
    lens = [c[0].shape[1] for c in rec.calls]
    assert lens == [4, 5, 6, 7, 4 + L + (L - 1), 4 + 2 * L + (L - 1)]
    seq = rec.calls[-1][0]
    # [cond, bov, z_0..z_{L-1}, middle bos 1..L-1, z_L ..]: fillers sit after z_{L-1}
    assert torch.equal(seq[:, :4], ids)
    assert torch.equal(seq[:, 4:4 + L], out[:, :L])
    assert seq[:, 4 + L:4 + 2 * L - 1].tolist() == [list(range(1, L))] * 2
    assert torch.equal(seq[:, 4 + 2 * L - 1:], out[:, L:2 * L])
    assert all(kw["hybrid"] and kw["block_size"] == L and c == 3 for _, c, kw in rec.calls)
    # the block step predicts from the last L logits of the full hybrid sequence
    full = m(rec.calls[4][0], 3, hybrid=True)
    assert torch.equal(full[:, -L:].argmax(-1), out[:, L:2 * L])


def test_cfg_zero_scale_equals_plain_and_guidance_changes_output():
    m = _model("tiny-hybrid")
    ids = torch.tensor([[4, 5, 6, 0], [7, 8, 9, 0]])
    kw = dict(cond_len=3, mode="hybrid", do_sample=False)
    plain = generate_tokens(m, ids, 8, **kw)
    assert torch.equal(generate_tokens(m, ids, 8, cfg_scale=0.0, **kw), plain)
    strong = generate_tokens(m, ids, 8, cfg_scale=20.0, **kw)
    assert not torch.equal(strong, plain)


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    m = _model("tiny")
    prefix = torch.randint(0, 64, (2, 4))
    kw = dict(top_k=1, top_p=0.9, temperature=0.7)
    a = generate_tokens(m, prefix, 8, generator=torch.Generator().manual_seed(3), **kw)
    b = generate_tokens(m, prefix, 8, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    assert torch.equal(a, generate_tokens(m, prefix, 8, do_sample=False))  # top_k=1 is greedy


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=0), "top_k"),
    (dict(temperature=0.0), "temperature"), (dict(mode="xyz"), "mode"),
    (dict(num_new_tokens=6), "multiple of the block size"),
    (dict(cfg_scale=1.0), "cfg_scale"), (dict(mode="hybrid"), "hybrid"),
    (dict(num_new_tokens=200), "max_seq_len"), (dict(cond_len=8), "cond_len"),
])
def test_bad_arguments_raise(kwargs, match):
    m = _model("tiny")
    args = {"num_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_tokens(m, torch.randint(0, 64, (1, 8)), **args)


def test_unaligned_prefix_and_out_of_vocab_ids_raise():
    m = _model("tiny")
    with pytest.raises(ValueError, match="whole blocks"):
        generate_tokens(m, torch.randint(0, 64, (1, 6)), 4)
    with pytest.raises(ValueError, match="ids must lie"):
        generate_tokens(m, torch.full((1, 4), 64), 4)
