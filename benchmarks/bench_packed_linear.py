"""Decode-step linears on the CPU: packed_linear vs torch (MKL) (pytest-benchmark).

    pytest benchmarks/bench_packed_linear.py --benchmark-only

The K600 model of issue 4 (6 x 384, vocabulary 64000), float32, for the rows
of one NTP step (1) and one NBP step (16): the vocabulary head alone, and the
36 layer linears of a step in turn. Before each (untimed) round a 64 MiB buffer is touched so
the weights come from memory, as in a decode step (the layers, attention and
sampler evict them). Compare within a group; absolute times hold for the
machine they were taken on.
"""
import pytest
import torch

from nbp_kernels.packed_linear import PackedLinear, is_available

OK, WHY = is_available()
WIDTH, VOCAB, LAYERS = 384, 64000, 6
_EVICT = torch.empty(16 << 20)


def _evict() -> None:
    _EVICT.add_(1.0)


def _linears(shapes):
    torch.manual_seed(0)
    return [torch.nn.Linear(i, o, bias=b) for o, i, b in shapes]


HEAD = _linears([(VOCAB, WIDTH, False)])
LAYER = _linears([(WIDTH, WIDTH, True)] * 4 + [(4 * WIDTH, WIDTH, True), (WIDTH, 4 * WIDTH, True)])
LAYERS_ALL = LAYER * LAYERS


def _fns(mods, impl):
    if impl == "torch":
        return [lambda x, m=m: m(x) for m in mods]
    if not OK:
        pytest.skip(f"packed_linear unusable here: {WHY}")
    return [PackedLinear(m) for m in mods]


def _bench(benchmark, mods, impl, rows):
    fns = _fns(mods, impl)
    xs = [torch.randn(1, rows, m.in_features) for m in mods]

    def step():
        for f, x in zip(fns, xs):
            f(x)

    with torch.no_grad():
        step()
        benchmark.pedantic(step, setup=_evict, rounds=40, iterations=1)


@pytest.mark.parametrize("impl", ["packed", "torch"])
@pytest.mark.parametrize("rows", [1, 16])
def test_head(benchmark, impl, rows):
    benchmark.group = f"head {VOCAB}x{WIDTH} rows={rows} fp32 threads={torch.get_num_threads()}"
    _bench(benchmark, HEAD, impl, rows)


@pytest.mark.parametrize("impl", ["packed", "torch"])
@pytest.mark.parametrize("rows", [1, 16])
def test_layer_linears(benchmark, impl, rows):
    benchmark.group = f"{len(LAYERS_ALL)} layer linears width {WIDTH} rows={rows} fp32 " \
                      f"threads={torch.get_num_threads()}"
    _bench(benchmark, LAYERS_ALL, impl, rows)
