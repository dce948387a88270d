"""A whole CPU decode step: one C call (``DecodeProgram``) vs the Python-driven step
(pytest-benchmark).

    pytest benchmarks/bench_decode_step_cpu.py --benchmark-only

The K600 model of the CPU study (6 x 384, vocabulary 64000; random weights), one
sequence, a cache holding 900 positions: an NBP step (16 tokens) and an NTP step
(1 token), at float32 weights and at int8 weights with int8 activations. Both
drivers run the same kernels (``ModelRunner.decode`` with ``programs`` on or off);
each call writes the same block at the same positions again, so the cache does
not grow. ``test_decode_step_cpu_draw``: the step with its sampling (top-k 16000,
top-p 0.9), the draw in the program's C call (``draw``, what ``FastGenerator``
runs) against the sampler called after it (``sampler``), through ``DecodeStep``. Bytes: the weights at their dtype and the cache read once (the step's
memory floor); FLOPs: 2 x tokens x the linears' weights. CPU only.
"""
import pytest
import torch

from nbp import NBPTransformer, TransformerConfig
from nbp.cache import StaticKVCache
from nbp.runner import DecodeStep, Kernels, ModelRunner
from nbp.sampler import BatchedSampler
from nbp.sampling import SamplingParams
from nbp_kernels.cpu_ops import PackedLinears
from nbp_kernels.decode_step_cpu import is_available
from suite import CUDA, record, run, smoke

pytestmark = pytest.mark.skipif(CUDA, reason="CPU kernels: the GPU run benchmarks the GPU paths")
WIDTH, VOCAB, LAYERS, HEADS, CACHED = (64, 1024, 2, 2, 40) if smoke() else (384, 64000, 6, 6, 900)
DTYPES = {"float32": (None, None), "int8_a16": (torch.int8, torch.int16),
          "int8_a8": (torch.int8, torch.int8)}


def _model() -> NBPTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=VOCAB, n_layer=LAYERS, n_head=HEADS, n_embd=WIDTH,
                            max_seq_len=1280, latent_shape=(5, 16, 16), block_shape=(1, 1, 16),
                            codebook_size=VOCAB)
    return NBPTransformer(cfg).eval()


MODEL = _model()


@pytest.mark.parametrize("driver", ["program", "python"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [16, 1], ids=["nbp16", "ntp1"])
def test_decode_step_cpu(benchmark, floors, driver, dtype, tokens):
    ok, why = is_available(int8_act=DTYPES[dtype][1] is not None)
    if not ok:
        pytest.skip(f"decode_step unusable here: {why}")
    benchmark.group = f"decode_step_cpu {dtype} {tokens} tokens"
    runner = _runner(dtype, tokens, programs=driver == "program")
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def step():
        runner.cache.seq_lens.fill_(CACHED)
        return runner.decode(ids, CACHED + tokens)
    run(benchmark, step, 30)
    _record(benchmark, floors, "decode_step_cpu", driver, dtype, tokens)


def _runner(dtype: str, tokens: int, programs: bool) -> ModelRunner:
    """A ModelRunner of MODEL at ``dtype``'s weights over a fresh one-sequence cache."""
    cfg = MODEL.config
    cache = StaticKVCache.for_model(cfg, 1, cfg.max_seq_len)
    kernels = Kernels.resolve("cpu", device=torch.device("cpu"), dtype=torch.float32,
                              head_dim=cfg.head_dim, block_size=tokens, step_lens=(tokens,))
    return ModelRunner(MODEL, cache, kernels=kernels, block_size=tokens, hybrid=False,
                       cond_len=0, length=cfg.max_seq_len, linear=PackedLinears(MODEL, *DTYPES[dtype]),
                       programs=programs)


@pytest.mark.parametrize("how", ["draw", "sampler"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [16, 1], ids=["nbp16", "ntp1"])
def test_decode_step_cpu_draw(benchmark, floors, how, dtype, tokens):
    ok, why = is_available(int8_act=DTYPES[dtype][1] is not None)
    if not ok:
        pytest.skip(f"decode_step unusable here: {why}")
    benchmark.group = f"decode_step_cpu+draw {dtype} {tokens} tokens"
    runner = _runner(dtype, tokens, programs=True)
    sampler = BatchedSampler(SamplingParams(top_k=min(16000, VOCAB), top_p=0.9))
    step = DecodeStep(runner, sampler, batch=1, n=tokens, cfg=False, use_graph=False)
    step.draw_in_program = how == "draw"
    step.ids.random_(0, VOCAB, generator=torch.Generator().manual_seed(0))
    step.noise.uniform_(0, 1, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def one():
        runner.cache.seq_lens.fill_(CACHED)
        step.run(None, CACHED + tokens)
        assert step.valid_on_host == (how == "draw")
        return step.tokens
    run(benchmark, one, 30)
    _record(benchmark, floors, "decode_step_cpu+draw", how, dtype, tokens)


def _record(benchmark, floors, op: str, impl: str, dtype: str, tokens: int) -> None:
    """Bytes: the weights at their dtype and the cache read once; FLOPs: the linears'."""
    linears = [m for m in MODEL.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() * (4 if dtype == "float32" else 1) for m in linears)
    macs = sum(m.weight.numel() for m in linears)
    record(benchmark, floors, op=op, impl=impl,
           shape=f"{LAYERS}x{WIDTH} V{VOCAB} tokens {tokens} cached {CACHED}",
           dtype=torch.float32, nbytes=weights + 2 * LAYERS * (CACHED + tokens) * WIDTH * 4,
           flops=2 * tokens * macs, weights=dtype, threads=torch.get_num_threads())
