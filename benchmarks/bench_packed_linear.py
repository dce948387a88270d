"""Decode-step linears on the CPU: ``nbp_kernels.packed_linear`` vs torch (MKL) (pytest-benchmark).

    pytest benchmarks/bench_packed_linear.py --benchmark-only

The K600 model of the CPU study (6 x 384, vocabulary 64000), float32, for the
rows of one NTP step (1) and one NBP step (16): the vocabulary head alone, and
the 36 layer linears of a step in turn. Before each (untimed) round a 64 MiB
buffer is touched so the weights come from memory, as in a decode step (the
layers, attention and sampler evict them). Bytes: the weights read once;
FLOPs: 2 x rows x in x out. CPU only (on a GPU the linears are cuBLAS's).

``test_fc1_gelu``: the MLP's first linear and its GELU at an NBP step (16 rows,
width -> 4 width), the GELU fused into the kernel (``act="gelu"``) against the
kernel then ``F.gelu``, with float32 and with int8 weights and activations.

``test_bf16_head``: the vocabulary head with bfloat16 weights, its rows in float32
(widened weights, FMAs) against rows rounded to bfloat16 (``act_dtype=torch.bfloat16``:
pair-packed weights, AVX512-BF16 dot products where the CPU has them).

``test_decode_layers``: the 6 decode layers of an NBP step (16 rows; attention
replaced by its value input, so only the linears and what lies between them
run) through ``Block.forward``, with the LayerNorms as the kernels' prologue and
the residual adds in their epilogue (``PackedLinears.fused``) against torch's
LayerNorm and add around the same kernels (q/k/v in one launch and fc1's GELU
fused in both).
"""
import pytest
import torch
import torch.nn.functional as F

from nbp import NBPTransformer, TransformerConfig
from nbp_kernels.cpu_ops import PackedLinears
from nbp_kernels.packed_linear import PackedLinear, is_available
from suite import CUDA, record, run, smoke

pytestmark = pytest.mark.skipif(CUDA, reason="CPU kernels: the GPU run benchmarks the GPU paths")
OK, WHY = is_available()
WIDTH, VOCAB, LAYERS = (64, 1024, 1) if smoke() else (384, 64000, 6)
_EVICT = torch.empty((1 << 14) if smoke() else (16 << 20))


def _evict() -> None:
    _EVICT.add_(1.0)


def _linears(shapes):
    torch.manual_seed(0)
    return [torch.nn.Linear(i, o, bias=b) for o, i, b in shapes]


HEAD = _linears([(VOCAB, WIDTH, False)])
LAYER = _linears([(WIDTH, WIDTH, True)] * 4 + [(4 * WIDTH, WIDTH, True), (WIDTH, 4 * WIDTH, True)])
SETS = {"head": HEAD, "layer_linears": LAYER * LAYERS}


def _fns(mods, impl):
    if impl == "torch":
        return [lambda x, m=m: m(x) for m in mods]
    if not OK:
        pytest.skip(f"packed_linear unusable here: {WHY}")
    return [PackedLinear(m) for m in mods]


@pytest.mark.parametrize("impl", ["packed", "torch"])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("which", sorted(SETS))
def test_packed_linear(benchmark, floors, which, impl, rows):
    mods = SETS[which]
    benchmark.group = f"packed_linear {which} ({len(mods)} linears, width {WIDTH}) rows={rows} fp32 " \
                      f"threads={torch.get_num_threads()}"
    fns = _fns(mods, impl)
    xs = [torch.randn(1, rows, m.in_features) for m in mods]

    def step():
        for f, x in zip(fns, xs):
            f(x)

    with torch.no_grad():
        run(benchmark, step, 40, setup=_evict)
    weights = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in mods)
    record(benchmark, floors, op="packed_linear", impl=impl, shape=f"{which} rows={rows} width={WIDTH}",
           dtype=torch.float32, nbytes=4 * weights,
           flops=sum(2 * rows * m.in_features * m.out_features for m in mods), rows=rows)


@pytest.mark.parametrize("act_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 16])
def test_bf16_head(benchmark, floors, rows, act_dtype):
    benchmark.group = f"packed_linear head rows={rows} bf16 weights " \
                      f"threads={torch.get_num_threads()}"
    if not OK:
        pytest.skip(f"packed_linear unusable here: {WHY}")
    act = torch.bfloat16 if act_dtype == "bf16" else None
    pl = PackedLinear(HEAD[0], weight_dtype=torch.bfloat16, act_dtype=act)
    x = torch.randn(1, rows, WIDTH)
    with torch.no_grad():
        run(benchmark, lambda: pl(x), 40, setup=_evict)
    record(benchmark, floors, op="packed_linear", impl=f"bf16 weights, {act_dtype} rows",
           shape=f"head rows={rows} {WIDTH}->{VOCAB}", dtype=torch.float32,
           nbytes=pl.packed.numel() * pl.packed.element_size(),
           flops=2 * rows * WIDTH * VOCAB, rows=rows)


@pytest.mark.parametrize("impl", ["fused", "separate"])
@pytest.mark.parametrize("act_dtype", ["fp32", "int8_a8"])
def test_fc1_gelu(benchmark, floors, act_dtype, impl):
    fc1 = _linears([(4 * WIDTH, WIDTH, True)])[0]
    rows = 16
    benchmark.group = f"fc1 + gelu {WIDTH} -> {4 * WIDTH} rows={rows} {act_dtype} " \
                      f"threads={torch.get_num_threads()}"
    if not OK:
        pytest.skip(f"packed_linear unusable here: {WHY}")
    int8 = torch.int8 if act_dtype == "int8_a8" else None
    pl = PackedLinear(fc1, weight_dtype=int8, act_dtype=int8)
    x = torch.randn(1, rows, WIDTH)
    fn = (lambda: pl(x, act="gelu")) if impl == "fused" else (lambda: F.gelu(pl(x)))
    with torch.no_grad():
        run(benchmark, fn, 200, setup=_evict)
    record(benchmark, floors, op="packed_linear", impl=f"{impl} gelu",
           shape=f"fc1 rows={rows} {WIDTH}->{4 * WIDTH} {act_dtype}", dtype=torch.float32,
           nbytes=pl.packed.numel() * pl.packed.element_size(),
           flops=2 * rows * WIDTH * 4 * WIDTH, rows=rows)


class _TorchNormAndAdd:
    """PackedLinears with the LayerNorms and residual adds in torch around its kernels
    (what a decode step ran before the prologue and epilogue existed)."""

    def __init__(self, linears: PackedLinears):
        self.linears = linears

    def __call__(self, module, x):
        return self.linears(module, x)

    def many(self, modules, x, norm=None):
        return self.linears.many(modules, x if norm is None else norm(x))

    def fused(self, module, x, norm=None, act=None, residual=None):
        y = self.linears.fused(module, x if norm is None else norm(x), act=act)
        return y if residual is None else residual + y


@pytest.mark.parametrize("impl", ["fused", "torch_norm_add"])
@pytest.mark.parametrize("act_dtype", ["fp32", "int8_a8"])
def test_decode_layers(benchmark, floors, act_dtype, impl):
    rows = 16
    benchmark.group = f"decode layers {LAYERS} x {WIDTH} rows={rows} {act_dtype} " \
                      f"threads={torch.get_num_threads()}"
    if not OK:
        pytest.skip(f"packed_linear unusable here: {WHY}")
    torch.manual_seed(0)
    cfg = TransformerConfig(n_layer=LAYERS, n_head=WIDTH // 64, n_embd=WIDTH)
    model = NBPTransformer(cfg).eval()
    int8 = torch.int8 if act_dtype == "int8_a8" else None
    linears = PackedLinears(model.blocks, weight_dtype=int8, act_dtype=int8)
    linear = linears if impl == "fused" else _TorchNormAndAdd(linears)
    x = torch.randn(1, rows, WIDTH)

    def attend(q, k, v, layer_idx):
        return v

    with torch.no_grad():
        run(benchmark, lambda: model.run_layers(x, attend, linear), 40, setup=_evict)
    packed = [p.packed for p in linears.packed.values()]
    record(benchmark, floors, op="packed_linear", impl=f"{impl} layers",
           shape=f"decode layers rows={rows} {LAYERS}x{WIDTH} {act_dtype}", dtype=torch.float32,
           nbytes=sum(p.numel() * p.element_size() for p in packed),
           flops=sum(2 * rows * m.in_features * m.out_features for m in linears.packed), rows=rows)
