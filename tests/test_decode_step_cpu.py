"""DecodeProgram (nbp_kernels/decode_step_cpu.py): a whole CPU decode step in one C call,
against the Python-driven step (the same kernels: bit for bit) and against
``reference.decode_step`` (tolerance), on every ISA path this machine runs."""
from __future__ import annotations

import pytest
import torch

from cpu_isa_paths import ISAS, force_isa
from nbp.cache import StaticKVCache
from nbp.config import TransformerConfig
from nbp.generate import FastGenerator
from nbp.model import NBPTransformer, call_module
from nbp.runner import Kernels, ModelRunner, cpu_program
from nbp_kernels import decode_attention_cpu, reference, torch_ops
from nbp_kernels.cpu_ops import PackedLinears
from nbp_kernels.decode_step_cpu import is_available

# name: (weight_dtype, act_dtype) of PackedLinears
DTYPES = {"float32": (None, None), "bfloat16": (torch.bfloat16, None),
          "int8": (torch.int8, None), "int8_a16": (torch.int8, torch.int16),
          "int8_a8": (torch.int8, torch.int8), "bfloat16_abf16": (torch.bfloat16, torch.bfloat16)}
# rounded activations: a rounding upstream can move a row's quantization step (one
# 127th of its largest value for int8, a 32767th for int16; a bfloat16 rounding flips
# between neighbours 2^-8 apart)
ROUNDING_TOL = {"int8_a8": 5e-2, "int8_a16": 1e-3, "bfloat16_abf16": 2e-2}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    return force_isa(monkeypatch, request.param, is_available, int8_act=True)


def model_of(n_head: int, head_dim: int, vocab: int, n_layer: int = 2) -> NBPTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                            n_embd=n_head * head_dim, max_seq_len=96, latent_shape=(3, 4, 4),
                            block_shape=(1, 1, 4), codebook_size=vocab)
    model = NBPTransformer(cfg).eval()
    with torch.no_grad():   # non-trivial LayerNorm and bias values
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def runner(model, linear, rows: int, prefix: int, programs: bool, seed: int = 1):
    """A ModelRunner over a fresh cache whose first ``prefix`` positions hold random keys and
    values (seq_lens = prefix, row r: prefix - r, so the rows differ)."""
    cfg = model.config
    cache = StaticKVCache.for_model(cfg, rows, cfg.max_seq_len)
    g = torch.Generator().manual_seed(seed)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    cache.seq_lens.copy_(torch.tensor([prefix - r for r in range(rows)], dtype=torch.int32))
    kernels = Kernels.resolve("auto", device=torch.device("cpu"), dtype=torch.float32,
                              head_dim=cfg.head_dim, block_size=cfg.block_size,
                              step_lens=(1, 2, 3, 4, 5, 7, 16))
    return ModelRunner(model, cache, kernels=kernels, block_size=cfg.block_size, hybrid=False,
                       cond_len=0, length=cfg.max_seq_len, linear=linear, programs=programs)


@torch.no_grad()
def two_steps(model, linear, rows: int, n: int, programs: bool):
    """Logits of two consecutive steps of n tokens, and the caches after them."""
    r = runner(model, linear, rows, prefix=21, programs=programs)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (2, rows, n), generator=g)
    out = [r.decode(ids[0], 21 + n).clone(), r.decode(ids[1], 21 + 2 * n).clone()]
    assert bool(r._programs and all(p is not None for p in r._programs.values())) == programs
    return out, r.cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16), (2, 5), (3, 4), (3, 3), (2, 1)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("heads", [(2, 16, 101), (2, 96, 64)], ids=["d16-v101", "d96"])
def test_program_matches_python_step(isa, dtype, shape, heads):
    """Same kernels, same order, same buffers: the logits and the caches are the Python-driven
    step's bit for bit (rows x tokens: one sequence of a block, odd blocks, CFG-like pairs).
    Under MIN_ROWS tokens the Python-driven step attends with SDPA (the program with its C
    kernel), and one row of float32 goes through BLAS for small weights: equal to rounding."""
    rows, n = shape
    model = model_of(*heads)
    linear = PackedLinears(model, *DTYPES[dtype])
    want, cache_py = two_steps(model, linear, rows, n, programs=False)
    got, cache_c = two_steps(model, linear, rows, n, programs=True)
    if n >= decode_attention_cpu.MIN_ROWS:
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert torch.equal(cache_c.k, cache_py.k) and torch.equal(cache_c.v, cache_py.v)
    else:
        tol = ROUNDING_TOL.get(dtype, 1e-5)
        for a, b in zip(got + [cache_c.k, cache_c.v], want + [cache_py.k, cache_py.v]):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert torch.equal(cache_c.seq_lens, cache_py.seq_lens)


def reference_blocks(model, dtype: str):
    """reference.decode_step's weights for ``model`` stored at ``dtype``."""
    wd, ad = DTYPES[dtype]

    def lin(*mods):
        w = torch.cat([m.weight.detach() for m in mods])
        b = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
        stored, scale = reference.quantize_weight(w, wd or torch.float32)
        return (stored if ad is not None else stored.float()), b, scale

    def ln(m):
        return m.weight.detach(), m.bias.detach(), m.eps
    blocks = [dict(ln1=ln(b.ln1), ln2=ln(b.ln2), qkv=lin(*b.attn.qkv), proj=lin(b.attn.proj),
                   fc1=lin(b.mlp[0]), fc2=lin(b.mlp[2])) for b in model.blocks]
    return blocks, ln(model.ln_f), lin(model.head)


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_program_matches_reference(isa, dtype):
    model = model_of(3, 32, 200, n_layer=3)
    rows, n = 2, 7
    r = runner(model, PackedLinears(model, *DTYPES[dtype]), rows, prefix=30, programs=True)
    k, v, lens = r.cache.k.clone(), r.cache.v.clone(), r.cache.seq_lens.clone()
    ids = torch.randint(0, 200, (rows, n), generator=torch.Generator().manual_seed(3))
    got = r.decode(ids, 30 + n)
    blocks, ln_f, head = reference_blocks(model, dtype)
    want = reference.decode_step(ids, lens, k, v, tok_emb=model.tok_emb.weight.detach(),
                                 pos_emb=model.pos_emb.detach()[0], blocks=blocks, ln_f=ln_f,
                                 head=head, n_head=3, act_dtype=DTYPES[dtype][1])
    tol = ROUNDING_TOL.get(dtype, 1e-4)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(r.cache.k, k, atol=tol, rtol=tol)
    assert torch.equal(r.cache.seq_lens, lens + n)


def test_program_refuses_bad_ids_before_writing(isa):
    model = model_of(2, 16, 101)
    r = runner(model, PackedLinears(model), 2, prefix=21, programs=True)
    k = r.cache.k.clone()
    ok = torch.zeros(2, 4, dtype=torch.long)
    program = r._program(ok)
    assert program is not None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        program(torch.tensor([[0, 1, 101, 2], [0, 0, 0, 0]]), r.cache.seq_lens, 40)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        program(ok, torch.tensor([21, 93], dtype=torch.int32), 96)   # position 96 > table
    with pytest.raises(ValueError, match="ids: expected contiguous int64"):
        program(ok[:1], r.cache.seq_lens, 40)
    with pytest.raises(ValueError, match="ids: expected contiguous int64"):
        program(ok.int(), r.cache.seq_lens, 40)
    with pytest.raises(ValueError, match="seq_lens: expected int32"):
        program(ok, r.cache.seq_lens.long(), 40)
    with pytest.raises(ValueError, match="length: expected 1..96"):
        program(ok, r.cache.seq_lens, 97)
    assert torch.equal(r.cache.k, k) and torch.equal(r.cache.seq_lens,
                                                     torch.tensor([21, 20], dtype=torch.int32))


def test_program_only_where_the_kernels_run_every_piece():
    model = model_of(2, 16, 101)
    cache = StaticKVCache.for_model(model.config, 1, 96)
    attn = decode_attention_cpu.block_decode_attention
    assert cpu_program(model, call_module, cache, attn, 4) is None
    assert cpu_program(model, PackedLinears(model), cache, torch_ops.block_decode_attention,
                       4) is None
    model.train()   # active dropout is not the kernels'
    model.blocks[0].attn.resid_drop.p = 0.1
    assert cpu_program(model, PackedLinears(model), cache, attn, 4) is None


@pytest.mark.parametrize("mode", ["nbp", "ntp"])
def test_generator_runs_programs_with_the_same_tokens(isa, mode):
    """FastGenerator drives its CPU decode steps through programs by default; NBP blocks
    draw the same tokens as the Python-driven steps."""
    model = model_of(2, 16, 101)
    cfg = model.config
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(4))
    out = {}
    for programs in (False, True):
        gen = FastGenerator(model, packed_linear=True)
        gen.decode_programs = programs
        out[programs] = gen.generate_tokens(ids, 24, mode=mode, top_k=50,
                                            generator=torch.Generator().manual_seed(5))
        used = [p for s in gen._steps.values() for p in s.runner._programs.values() if p]
        assert bool(used) == programs
    if mode == "nbp":   # rows x 4 tokens a step: the kernels everywhere on both paths
        assert torch.equal(out[True], out[False])
    assert out[True].shape == (2, 24) and int(out[True].max()) < cfg.vocab_size


@torch.no_grad()
def test_program_times_its_pieces_when_asked(isa):
    """With a ``timing`` tensor the program adds each piece's seconds to it (the step breakdown
    benchmark reads them), the draw's only when it draws; without one it writes nothing."""
    from nbp_kernels.decode_step_cpu import PIECES

    model = model_of(2, 16, 101)
    r = runner(model, PackedLinears(model), 1, prefix=21, programs=True)
    ids = torch.zeros(1, 4, dtype=torch.long)
    program = r._program(ids)
    program(ids, r.cache.seq_lens, 40)
    assert program.timing is None
    program.timing = torch.zeros(len(PIECES), dtype=torch.float64)
    program(ids, r.cache.seq_lens, 40)
    first = program.timing.clone()
    step = [PIECES.index(p) for p in ("embedding", "linears", "attention", "head")]
    assert (first[step] > 0).all() and first.sum() < 10 and first[PIECES.index("sampler")] == 0
    program.draw(ids, r.cache.seq_lens, 40, **draw_args(program, 1, 4))
    assert (program.timing > first).all()
    program.timing = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"timing: expected None or a contiguous float64 CPU "
                                         r"tensor \[5\]"):
        program(ids, r.cache.seq_lens, 40)


def draw_args(program, rows: int, n: int, top_k: int = 7, top_p: float = 0.8,
              seed: int = 3) -> dict:
    """DecodeProgram.draw's keyword arguments for rows x n tokens (fresh buffers)."""
    from nbp_kernels import sample_cpu

    u = torch.rand(rows * n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return dict(top_k=top_k, top_p=top_p, u=u, tokens=torch.full((rows, n), -5),
                work=torch.empty(sample_cpu.work_shape(rows * n, program.logits.shape[-1])))


@pytest.mark.parametrize("sampling", [(7, 0.8), (101, 1.0), (1, 1.0), (101, 0.3)],
                         ids=["k7-p0.8", "unfiltered", "k1", "p0.3"])
@pytest.mark.parametrize("rows", [1, 3])
@torch.no_grad()
def test_program_draw_is_the_step_then_the_sampler(isa, sampling, rows):
    """draw() = the step (logits and caches bit for bit), seq_lens + L, then
    sample_cpu.sample over its logits with the same uniforms: the same tokens."""
    from nbp_kernels import sample_cpu

    model = model_of(2, 16, 101)
    linear = PackedLinears(model)
    ids = torch.randint(0, 101, (rows, 4), generator=torch.Generator().manual_seed(6))
    plain, fused = (runner(model, linear, rows, prefix=21, programs=True) for _ in range(2))
    lens = plain.cache.seq_lens.clone()
    logits = plain._program(ids)(ids, plain.cache.seq_lens, 40).clone()
    program = fused._program(ids)
    args = draw_args(program, rows, 4, *sampling)
    want, bad = sample_cpu.sample(logits.view(rows * 4, -1), *sampling, args["u"])
    assert program.draw(ids, fused.cache.seq_lens, 40, **args) == 0 and bad == 0
    assert torch.equal(args["tokens"].view(-1), want)
    assert torch.equal(program.logits, logits)
    assert torch.equal(fused.cache.k, plain.cache.k) and torch.equal(fused.cache.v, plain.cache.v)
    assert torch.equal(fused.cache.seq_lens, lens + 4)


@torch.no_grad()
def test_program_draw_refuses_bad_arguments_before_running(isa):
    model = model_of(2, 16, 101)
    r = runner(model, PackedLinears(model), 2, prefix=21, programs=True)
    ids = torch.zeros(2, 4, dtype=torch.long)
    program = r._program(ids)
    k, lens = r.cache.k.clone(), r.cache.seq_lens.clone()
    ok = draw_args(program, 2, 4)
    bad = {"top_k": [0, 102, 3.0, True], "top_p": [0.0, 1.5, "0.9", False],
           "u": [ok["u"].float(), ok["u"][:7], ok["u"].view(4, 2)],
           "tokens": [ok["tokens"].int(), ok["tokens"][:1], ok["tokens"].t()],
           "work": [ok["work"][:7], ok["work"].double()]}
    for name, values in bad.items():
        for value in values:
            with pytest.raises(ValueError, match=f"^{name}: expected"):
                program.draw(ids, r.cache.seq_lens, 40, **{**ok, name: value})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        program.draw(ids + 101, r.cache.seq_lens, 40, **ok)
    assert torch.equal(r.cache.k, k) and torch.equal(r.cache.seq_lens, lens)
    assert (ok["tokens"] == -5).all()


@torch.no_grad()
def test_program_draw_reports_rows_without_a_distribution(isa):
    """NaN logits: draw() returns how many rows could not be sampled (tokens -1), and leaves
    the logits in place for the sampler that flags the step."""
    model = model_of(2, 16, 101)
    with torch.no_grad():
        model.head.weight[5, 0] = float("nan")
    r = runner(model, PackedLinears(model), 2, prefix=21, programs=True)
    ids = torch.zeros(2, 4, dtype=torch.long)
    program = r._program(ids)
    args = draw_args(program, 2, 4)
    assert program.draw(ids, r.cache.seq_lens, 40, **args) == 8
    assert (args["tokens"] == -1).all() and program.logits[:, :, 5].isnan().all()


def test_program_refuses_linears_of_other_widths(isa):
    from nbp_kernels.decode_step_cpu import DecodeProgram, LayerParts

    model = model_of(2, 16, 101)
    linear = PackedLinears(model)
    cache = StaticKVCache.for_model(model.config, 1, 96)
    b = model.blocks[0]
    parts = dict(qkv=linear.stacked(b.attn.qkv), proj=linear.packed[b.attn.proj],
                 fc1=linear.packed[b.mlp[0]], fc2=linear.packed[b.mlp[2]],
                 ln1=linear.norm_args(b.ln1), ln2=linear.norm_args(b.ln2))
    kw = dict(tok_emb=model.tok_emb.weight.detach(), pos_emb=model.pos_emb.detach()[0],
              ln_f=linear.norm_args(model.ln_f), head=linear.packed[model.head],
              k_cache=cache.k, v_cache=cache.v, block=4)
    ok = [LayerParts(**parts) for _ in model.blocks]
    assert DecodeProgram(layers=ok, **kw) is not None
    bad = [LayerParts(**parts), LayerParts(**{**parts, "proj": parts["fc1"]})]
    with pytest.raises(ValueError, match=r"layers\[1\]\.proj: expected 32 -> 32 features"):
        DecodeProgram(layers=bad, **kw)
    with pytest.raises(ValueError, match="head: expected 32 -> 101"):
        DecodeProgram(layers=ok, **{**kw, "head": parts["fc1"]})


@pytest.mark.parametrize("batch", [1, 2], ids=["lane", "step"])
def test_generator_rebinds_the_draw_for_each_request(isa, batch, monkeypatch):
    """A FastGenerator reused across requests (other top-k / top-p, other seeds) draws what a
    fresh one draws: each request binds the program's draw anew (one sequence: the
    ProgramLane, its ids and tokens inside the output; more: DecodeStep's buffers)."""
    from nbp_kernels.decode_step_cpu import BoundDraw

    calls = {"__call__": 0, "at": 0}
    for name in calls:
        def counted(self, *a, _f=getattr(BoundDraw, name), _n=name):
            calls[_n] += 1
            return _f(self, *a)
        monkeypatch.setattr(BoundDraw, name, counted)
    model = model_of(2, 16, 101)
    ids = torch.randint(0, 101, (batch, 8), generator=torch.Generator().manual_seed(4))
    requests = [dict(top_k=5), dict(top_k=50, top_p=0.7), dict(top_k=5), dict()]

    def run(gen, kw, seed):
        return gen.generate_tokens(ids, 16, top_k=kw.get("top_k"), top_p=kw.get("top_p"),
                                   generator=torch.Generator().manual_seed(seed))
    shared = FastGenerator(model, packed_linear=True)
    for seed, kw in enumerate(requests):
        got = run(shared, kw, seed)
        assert torch.equal(got, run(FastGenerator(model, packed_linear=True), kw, seed)), kw
    # 3 decode steps a request, 8 requests (shared and fresh)
    assert calls == ({"__call__": 0, "at": 24} if batch == 1 else {"__call__": 24, "at": 0})


@pytest.mark.parametrize("mode", ["nbp", "ntp"])
def test_lane_draws_what_the_step_by_step_loop_draws(isa, mode):
    """One sequence: the ProgramLane (ids and tokens in place in the output) draws the tokens
    of the general loop with the sampler after each program step, bit for bit."""
    model = model_of(2, 16, 101)
    ids = torch.randint(0, 101, (1, 8), generator=torch.Generator().manual_seed(4))
    out = {}
    for in_program in (True, False):
        gen = FastGenerator(model, packed_linear=True)
        gen.draw_in_program = in_program
        out[in_program] = gen.generate_tokens(ids, 24, mode=mode, top_k=50, top_p=0.95,
                                              generator=torch.Generator().manual_seed(5))
    assert torch.equal(out[True], out[False])


def test_lane_flags_a_step_without_a_distribution(isa, monkeypatch):
    """NaN embeddings for every id but the prompt's: the prefill's step 0 draws, the lane's
    step 1 has NaN logits, and the generation stops naming it."""
    from nbp_kernels.decode_step_cpu import BoundDraw

    ran = []
    at = BoundDraw.at
    monkeypatch.setattr(BoundDraw, "at", lambda self, *a: ran.append(1) or at(self, *a))
    model = model_of(2, 16, 101)
    ids = torch.full((1, 8), 7)
    with torch.no_grad():
        keep = model.tok_emb.weight[7].clone()
        model.tok_emb.weight.fill_(float("nan"))
        model.tok_emb.weight[7] = keep
    gen = FastGenerator(model, packed_linear=True)
    with pytest.raises(ValueError, match="step 1 "):
        gen.generate_tokens(ids, 12, top_k=5, generator=torch.Generator().manual_seed(0))
    assert ran == [1]
