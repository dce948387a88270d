"""FastGenerator (nbp.generate, nbp.runner, nbp.cache) against the reference generator."""
from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nbp.cache import StaticKVCache
from nbp.config import TransformerConfig
from nbp.runner import PackedLinears
from nbp.generate import FastGenerator
from nbp.model import NBPTransformer, call_module
from nbp_kernels.packed_linear import is_available
from nbp.reference import generate_tokens as reference_generate

ROOT = Path(__file__).resolve().parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sharp_model(preset: str, seed: int = 0, **overrides) -> NBPTransformer:
    """A tiny random model with weights scaled up, so its logits are far from uniform
    and greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = NBPTransformer(TransformerConfig.from_preset(preset, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model


def inputs(cfg: TransformerConfig, mode: str, cond: int, batch: int = 2, blocks: int = 2,
           seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(cfg.cond_offset, cfg.cond_offset + max(cfg.cond_vocab_size, 1), (batch, cond),
                      generator=g)
    if mode == "hybrid":
        return torch.cat([c, torch.full((batch, 1), cfg.bov_id)], dim=1)
    video = torch.randint(cfg.video_offset, cfg.vocab_size, (batch, blocks * cfg.block_size),
                          generator=g)
    return torch.cat([c, video], dim=1)


CASES = [  # preset, mode, cond_len, cfg_scale
    ("tiny", "nbp", 0, None), ("tiny", "ntp", 0, None),
    ("tiny-hybrid", "hybrid", 3, None), ("tiny-hybrid", "hybrid", 3, 2.0),
    ("tiny-hybrid", "nbp", 3, None), ("tiny-hybrid", "nbp", 3, 1.5),
    ("tiny-hybrid", "ntp", 3, None), ("tiny-hybrid", "ntp", 3, 0.5),
]


@pytest.mark.parametrize("packed", [False, "auto"], ids=["torch-linear", "packed-linear"])
@pytest.mark.parametrize("preset, mode, cond, cfg_scale", CASES)
def test_greedy_equals_reference(preset, mode, cond, cfg_scale, packed):
    model = sharp_model(preset)
    ids = inputs(model.config, mode, cond)
    kw = dict(cond_len=cond, mode=mode, do_sample=False, cfg_scale=cfg_scale, cfg_schedule="linear")
    ref = reference_generate(model, ids, 16, **kw)
    fast = FastGenerator(model, backend="torch", packed_linear=packed).generate_tokens(ids, 16, **kw)
    assert fast.shape == (2, 16) and fast.dtype == torch.long
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("preset, mode, cond, cfg_scale", CASES[::2] + CASES[3:4])
def test_seeded_sampling_equals_reference_with_multinomial_draw(preset, mode, cond, cfg_scale):
    model = sharp_model(preset, seed=1)
    ids = inputs(model.config, mode, cond, seed=1)
    kw = dict(cond_len=cond, mode=mode, top_k=20, top_p=0.9, temperature=1.3, cfg_scale=cfg_scale)
    ref = reference_generate(model, ids, 16, generator=torch.Generator().manual_seed(7), **kw)
    gen = FastGenerator(model, backend="torch", draw="multinomial")
    fast = gen.generate_tokens(ids, 16, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(fast, ref)


def test_fast_draw_is_seeded_and_in_range():
    model = sharp_model("tiny", seed=2)
    gen = FastGenerator(model)
    ids = inputs(model.config, "nbp", 0)

    def run(seed):
        return gen.generate_tokens(ids, 24, top_k=10, top_p=0.95,
                                   generator=torch.Generator().manual_seed(seed))
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0 <= int(a.min()) and int(a.max()) < model.config.vocab_size


def test_static_cache_is_reused_and_advanced_in_place():
    model = sharp_model("tiny")
    gen = FastGenerator(model)
    ids = inputs(model.config, "nbp", 0)
    gen.generate_tokens(ids, 16, do_sample=False)
    cache = gen.cache
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
    # prefill (8) + fed blocks: every block but the last one is fed back
    assert cache.seq_lens.tolist() == [8 + 12] * 2
    gen.generate_tokens(ids, 12, do_sample=False)
    assert gen.cache is cache and (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs
    assert cache.seq_lens.tolist() == [8 + 8] * 2


def test_cached_keys_equal_a_full_forward():
    """After generation the cache holds exactly the keys a teacher-forced pass computes."""
    model = sharp_model("tiny")
    gen = FastGenerator(model)
    ids = inputs(model.config, "nbp", 0, batch=1)
    new = gen.generate_tokens(ids, 12, do_sample=False)
    seq = torch.cat([ids, new[:, :-4]], dim=1)        # the last block is never fed
    keys = []
    attend = model.block_causal_attend(backend="reference")

    def spy(q, k, v, i):
        keys.append(k)
        return attend(q, k, v, i)
    with torch.no_grad():
        model.run_layers(model.embed(seq), spy)
    for i, k in enumerate(keys):
        torch.testing.assert_close(gen.cache.k[i, :, :, :seq.shape[1]], k, rtol=1e-5, atol=1e-5)


def test_callback_sees_every_step():
    model = sharp_model("tiny-hybrid")
    ids = inputs(model.config, "hybrid", 3)
    seen = []
    out = FastGenerator(model).generate_tokens(ids, 16, cond_len=3, mode="hybrid", do_sample=False,
                                               callback=lambda s, t: seen.append((s, t.clone())))
    assert [s for s, _ in seen] == list(range(4 + 3))          # L singles, then 3 blocks
    assert [t.shape[1] for _, t in seen] == [1, 1, 1, 1, 4, 4, 4]
    assert torch.equal(torch.cat([t for _, t in seen], dim=1), out)


def test_packed_linear_option():
    """"auto" packs a float32 CPU model's linears when the kernel is usable; bad values raise
    before the model is touched."""
    model = sharp_model("tiny")
    ok, _ = is_available()
    assert isinstance(FastGenerator(model).linear, PackedLinears) == ok
    assert FastGenerator(model, packed_linear=False).linear is call_module
    with pytest.raises(ValueError, match="packed_linear: expected 'auto', True or False"):
        FastGenerator(model, packed_linear="yes")
    with pytest.raises(ValueError, match="packed_linear: True, but the kernel is not usable"):
        FastGenerator(model, dtype=torch.bfloat16, packed_linear=True)
    assert next(model.parameters()).dtype == torch.float32


def test_decode_attention_traces_without_graph_breaks():
    """The registry lookup is traceable, so a compiled decode step is one graph."""
    import nbp_kernels
    q, kn, vn = (torch.randn(1, 2, 4, 16) for _ in range(3))
    kc, vc = torch.zeros(1, 2, 12, 16), torch.zeros(1, 2, 12, 16)
    sl = torch.tensor([3], dtype=torch.int32)

    def step(q, kc, vc, sl, kn, vn):
        return nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn,
                                                  backend="auto", check_bounds=False)
    want = step(q, kc.clone(), vc.clone(), sl, kn, vn)
    got = torch.compile(step, fullgraph=True, backend="eager")(q, kc, vc, sl, kn, vn)
    torch.testing.assert_close(got, want)


def test_decode_loop_has_no_host_sync():
    src = inspect.getsource(FastGenerator._decode_loop)
    body = src[src.index("for s in steps"):]
    for bad in (".item(", ".tolist(", "int(", "float(", "print(", ".cpu(", ".numpy("):
        assert bad not in body, bad


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_new_tokens=6), "num_new_tokens"),           # not a multiple of L = 4
    (dict(top_p=1.5), "top_p"), (dict(top_p=0.0), "top_p"),
    (dict(cfg_scale=1.0), "cfg_scale"),                  # the tiny model has no condition
    (dict(mode="diffusion"), "mode"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_inputs_raise(kwargs, match):
    model = sharp_model("tiny")
    ids = inputs(model.config, "nbp", 0)
    args = dict(num_new_tokens=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FastGenerator(model).generate_tokens(ids, **args)


@pytest.mark.parametrize("preset, mode, cond", [("tiny", "nbp", 0), ("tiny-hybrid", "hybrid", 3),
                                                ("tiny-hybrid", "ntp", 3)])
def test_generation_fills_the_position_table_like_training(preset, mode, cond):
    """A model reads every input and new token but the last step's (training inputs stop L
    tokens before the end), so a request may end exactly L tokens past max_seq_len."""
    model = sharp_model(preset)
    cfg = model.config
    ids = inputs(cfg, mode, cond, blocks=1)
    last = 1 if mode == "ntp" else cfg.block_size
    fillers = cfg.block_size - 1 if mode == "hybrid" else 0
    new = cfg.max_seq_len - ids.shape[1] - fillers + last
    new -= new % last
    out = FastGenerator(model).generate_tokens(ids, new, cond_len=cond, mode=mode, do_sample=False)
    ref = reference_generate(model, ids, new, cond_len=cond, mode=mode, do_sample=False)
    assert torch.equal(out, ref)
    for gen in (FastGenerator(model).generate_tokens, lambda *a, **k: reference_generate(model, *a, **k)):
        with pytest.raises(ValueError, match="max_seq_len"):
            gen(ids, new + last, cond_len=cond, mode=mode, do_sample=False)


def test_cache_too_small_and_batch_too_large_raise():
    model = sharp_model("tiny")
    ids = inputs(model.config, "nbp", 0)
    with pytest.raises(ValueError, match="max_seq_len"):
        FastGenerator(model, max_seq_len=16).generate_tokens(ids, 16)
    with pytest.raises(ValueError, match="max_batch_size"):
        FastGenerator(model, max_batch_size=1).generate_tokens(ids, 8)
    with pytest.raises(ValueError, match="cuda_graphs"):
        FastGenerator(model, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="backend"):
        FastGenerator(model, backend="magic")
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(2, 1, 2, 0, 16)


def test_baseline_generator_matches_reference():
    spec = importlib.util.spec_from_file_location("nbp_bench_baseline",
                                                  ROOT / "benchmarks/ablations/baseline.py")
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    model = sharp_model("tiny")
    ids = inputs(model.config, "nbp", 0)
    for mode in ("nbp", "ntp"):
        assert torch.equal(baseline.generate_tokens(model, ids, 16, mode=mode, do_sample=False),
                           reference_generate(model, ids, 16, mode=mode, do_sample=False))


# --- devices and memory (issue 18, item 7) -------------------------------------------

@pytest.mark.parametrize("device, match", [("cuda", "not available"), ("cuda:0", "not available"),
                                           ("meta", "cannot run"), ("banana", "expected a torch device"),
                                           (3.5, "expected a torch device")])
def test_unavailable_device_is_refused_before_the_model_moves(monkeypatch, device, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = sharp_model("tiny")
    with pytest.raises(ValueError, match=f"^device: .*{match}"):
        FastGenerator(model, device=device, dtype=torch.bfloat16)
    assert next(model.parameters()).device.type == "cpu"
    assert next(model.parameters()).dtype == torch.float32


def test_batch_that_cannot_fit_is_refused_before_allocating(monkeypatch, tiny_tokenizer):
    import nbp.devices
    model = sharp_model("tiny")
    gen = FastGenerator(model, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"^batch_size: 1000000000 sequences .* bytes .* available"):
        gen.check_batch_fits(10 ** 9)                   # exabytes: no machine has them
    gen.check_batch_fits(2)
    free = 10_000                                       # bytes: less than any cache of this model
    monkeypatch.setattr(nbp.devices, "available_bytes", lambda device: free)
    with pytest.raises(ValueError, match=r"^batch: 4 cache rows .*needs at least [\d,]+ bytes.* 10,000 bytes"):
        gen.generate_tokens(inputs(model.config, "nbp", 0, batch=4), 8)
    assert gen.cache is None
    encoded = []
    monkeypatch.setattr(tiny_tokenizer, "encode", lambda x: encoded.append(x))
    with pytest.raises(ValueError, match="^batch_size: 3 sequences"):
        gen.predict_frames(torch.rand(3, 3, 9, 32, 32))
    assert not encoded                                  # refused before encoding the frames
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        gen.check_batch_fits(0)


def test_available_bytes_reads_the_device():
    from nbp.devices import available_bytes
    cpu = available_bytes(torch.device("cpu"))
    assert cpu is None or cpu > 0
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        assert free <= available_bytes(torch.device("cuda")) <= total


# --- video-level tasks with the tiny tokenizer ---------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from nbp.tokenizer import TokenizerConfig, VideoTokenizer
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerConfig.from_preset("tiny")).eval()


def test_predict_frames_keeps_the_given_latents(tiny_tokenizer):
    from nbp.blocks import from_block_order, to_block_order
    model = sharp_model("tiny")                        # latent grid (3, 4, 4) = 9 frames 32x32
    gen = FastGenerator(model, tiny_tokenizer)
    video = torch.rand(2, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0))
    out = gen.predict_frames(video, num_cond_frames=5, do_sample=False)
    assert out.shape == (2, 3, 9, 32, 32) and 0 <= float(out.min()) and float(out.max()) <= 1
    codes = tiny_tokenizer.encode(video[:, :, :5])     # 2 latent frames
    prefix = to_block_order(codes, model.config.block_shape)
    new = reference_generate(model, prefix, 16, do_sample=False)
    grid = from_block_order(torch.cat([prefix, new], 1), model.config.latent_shape,
                            model.config.block_shape)
    torch.testing.assert_close(out, tiny_tokenizer.decode(grid))
    with pytest.raises(ValueError, match="num_cond_frames"):
        gen.predict_frames(video, num_cond_frames=4)


def test_generate_video_class_conditional_hybrid(tiny_tokenizer):
    model = sharp_model("tiny-hybrid", cond_len=1, cond_vocab_size=10, vocab_size=4 + 10 + 64)
    gen = FastGenerator(model, tiny_tokenizer)
    out = gen.generate_video(class_ids=[3, 7], do_sample=False)
    assert out.shape == (2, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="class_ids"):
        gen.generate_video(class_ids=[10])
    with pytest.raises(ValueError, match="cond_ids"):
        gen.generate_video()
    with pytest.raises(ValueError, match="predict_frames"):
        FastGenerator(sharp_model("tiny"), tiny_tokenizer).generate_video()


def test_generate_video_bov_layout_matches_shipped_demo():
    """Non-hybrid models with a begin-of-video id start from a whole block of bov ids."""
    demo_mod = pytest.importorskip("nbp.demo")
    try:
        demo = demo_mod.load_demo()
    except (OSError, ValueError) as e:
        pytest.skip(f"no demo assets: {e}")
    gen = FastGenerator(demo.model("nbp"), demo.tokenizer)
    ours = gen.generate_video(class_ids=[1, 2], do_sample=False)
    assert torch.equal(ours, demo_mod.generate_class(gen, [1, 2], do_sample=False))


def test_block_shape_permutation_round_trip(tiny_tokenizer):
    """A non-row block shape: predicted grids go back to raster order before decoding."""
    model = sharp_model("tiny", block_shape=(1, 2, 2))
    gen = FastGenerator(model, tiny_tokenizer)
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(1))
    out = gen.predict_frames(video, num_cond_frames=5, do_sample=False)
    assert out.shape == (1, 3, 9, 32, 32)


# --- other backends -------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent("""
    import sys, torch, nbp_kernels
    if not nbp_kernels.backend_status("triton", "cpu")[0]:
        sys.exit(77)
    from tests.test_generate import sharp_model, inputs
    from nbp.generate import FastGenerator
    from nbp.reference import generate_tokens as ref
    for preset, mode, cond, cfg in (("tiny", "nbp", 0, None), ("tiny-hybrid", "hybrid", 3, 2.0)):
        model = sharp_model(preset)
        ids = inputs(model.config, mode, cond)
        kw = dict(cond_len=cond, mode=mode, do_sample=False, cfg_scale=cfg)
        a = FastGenerator(model, backend="triton").generate_tokens(ids, 8, **kw)
        assert torch.equal(a, ref(model, ids, 8, **kw)), (preset, mode)
""")


def test_triton_backend_in_interpreter_equals_reference():
    """Runs in a subprocess: the interpreter must be chosen before triton is imported."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        pytest.skip("triton backend not usable in the interpreter")
    assert r.returncode == 0, r.stderr[-3000:]


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("do_sample", [False, True])
def test_cuda_graph_equals_eager(do_sample):
    model = sharp_model("tiny-hybrid").cuda()
    ids = inputs(model.config, "nbp", 3).cuda()
    kw = dict(cond_len=3, do_sample=do_sample, top_k=20, top_p=0.9, cfg_scale=1.5)
    eager = FastGenerator(model, cuda_graphs=False).generate_tokens(
        ids, 16, generator=torch.Generator("cuda").manual_seed(0), **kw)
    graphed = FastGenerator(model, cuda_graphs=True)
    for _ in range(2):   # capture, then replay the captured graph
        out = graphed.generate_tokens(ids, 16, generator=torch.Generator("cuda").manual_seed(0), **kw)
        assert torch.equal(out, eager)
    assert any(s.graph is not None for s in graphed._steps.values())


@CUDA
@pytest.mark.gpu
def test_bf16_greedy_close_to_fp32_reference():
    model = sharp_model("tiny")
    ids = inputs(model.config, "nbp", 0)
    ref = reference_generate(model, ids, 16, do_sample=False)
    import copy
    fast = FastGenerator(copy.deepcopy(model), device="cuda", dtype=torch.bfloat16)
    out = fast.generate_tokens(ids.cuda(), 16, do_sample=False).cpu()
    # bf16 rounding may flip a few near-ties, and a flip changes what follows
    assert (out == ref).float().mean() >= 0.75


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("preset, mode, cond, cfg_scale", CASES)
def test_gpu_backends_greedy_equal_reference(backend, preset, mode, cond, cfg_scale):
    """fp32 on the GPU, graphs on: every usable backend gives the reference's tokens."""
    import nbp_kernels

    ok, why = nbp_kernels.backend_status(backend, "cuda")
    if not ok:
        pytest.skip(f"backend {backend} not usable: {why}")
    model = sharp_model(preset)
    ids = inputs(model.config, mode, cond)
    n = 2 * model.config.block_size
    kw = dict(cond_len=cond, mode=mode, do_sample=False, cfg_scale=cfg_scale)
    ref = reference_generate(model, ids, n, **kw)
    import copy
    gen = FastGenerator(copy.deepcopy(model), device="cuda", backend=backend, cuda_graphs=True)
    for _ in range(2):   # capture, then replay
        assert torch.equal(gen.generate_tokens(ids.cuda(), n, **kw).cpu(), ref)
