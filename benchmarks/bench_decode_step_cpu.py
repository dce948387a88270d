"""A whole CPU decode step: one C call (``DecodeProgram``) vs the Python-driven step
(pytest-benchmark).

    pytest benchmarks/bench_decode_step_cpu.py --benchmark-only

The K600 model of the CPU study (6 x 384, vocabulary 64000; random weights), one
sequence, a cache holding 900 positions: an NBP step (16 tokens) and an NTP step
(1 token), at float32 weights and at int8 weights with int16 or int8 activations.
Drivers ``program`` and ``python`` run the same kernels (``ModelRunner.decode`` with
``programs`` on or off); ``draw`` and ``sampler`` add the step's sampling (top-k
16000, top-p 0.9) through ``DecodeStep``, the draw in the program's C call (what
``FastGenerator`` runs) or the sampler called after it. Each call writes the same
block at the same positions again, so the cache does not grow. Bytes: the weights at
their dtype and the cache read once (the step's memory floor); FLOPs: 2 x tokens x
the linears' weights. CPU only.
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


@pytest.mark.parametrize("driver", ["program", "python", "draw", "sampler"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [16, 1], ids=["nbp16", "ntp1"])
def test_decode_step_cpu(benchmark, floors, driver, dtype, tokens):
    _require(dtype)
    sampled = driver in ("draw", "sampler")
    benchmark.group = f"decode_step_cpu{'+draw' if sampled else ''} {dtype} {tokens} tokens"
    runner = _runner(dtype, tokens, programs=driver != "python")
    fn = _sampled_step(runner, tokens, driver == "draw") if sampled else _step(runner, tokens)
    run(benchmark, fn, 30)
    _record(benchmark, floors, "decode_step_cpu+draw" if sampled else "decode_step_cpu",
            driver, dtype, tokens)


def _step(runner: ModelRunner, tokens: int):
    """The step alone (``ModelRunner.decode``), the same block at the same positions."""
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def step():
        runner.cache.seq_lens.fill_(CACHED)
        return runner.decode(ids, CACHED + tokens)
    return step


def _sampled_step(runner: ModelRunner, tokens: int, in_program: bool):
    """The step and its sampling through ``DecodeStep``: the draw in the program's call, or
    the sampler after it."""
    sampler = BatchedSampler(SamplingParams(top_k=min(16000, VOCAB), top_p=0.9))
    step = DecodeStep(runner, sampler, batch=1, n=tokens, cfg=False, use_graph=False)
    step.draw_in_program = in_program
    step.ids.random_(0, VOCAB, generator=torch.Generator().manual_seed(0))
    step.noise.uniform_(0, 1, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def one():
        runner.cache.seq_lens.fill_(CACHED)
        step.run(None, CACHED + tokens)
        assert step.valid_on_host == in_program
        return step.tokens
    return one


def _require(dtype: str) -> None:
    ok, why = is_available(int8_act=DTYPES[dtype][1] is not None)
    if not ok:
        pytest.skip(f"decode_step unusable here: {why}")


def _runner(dtype: str, tokens: int, programs: bool) -> ModelRunner:
    """A ModelRunner of MODEL at ``dtype``'s weights over a fresh one-sequence cache."""
    cfg = MODEL.config
    cache = StaticKVCache.for_model(cfg, 1, cfg.max_seq_len)
    kernels = Kernels.resolve("cpu", device=torch.device("cpu"), dtype=torch.float32,
                              head_dim=cfg.head_dim, block_size=tokens, step_lens=(tokens,))
    linear = PackedLinears(MODEL, *DTYPES[dtype])
    return ModelRunner(MODEL, cache, kernels=kernels, block_size=tokens, hybrid=False,
                       cond_len=0, length=cfg.max_seq_len, linear=linear, programs=programs)


def _record(benchmark, floors, op: str, impl: str, dtype: str, tokens: int) -> None:
    """Bytes: the weights at their dtype and the cache read once; FLOPs: the linears'."""
    linears = [m for m in MODEL.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() * (4 if dtype == "float32" else 1) for m in linears)
    macs = sum(m.weight.numel() for m in linears)
    record(benchmark, floors, op=op, impl=impl,
           shape=f"{LAYERS}x{WIDTH} V{VOCAB} tokens {tokens} cached {CACHED}",
           dtype=torch.float32, nbytes=weights + 2 * LAYERS * (CACHED + tokens) * WIDTH * 4,
           flops=2 * tokens * macs, weights=dtype, threads=torch.get_num_threads())
