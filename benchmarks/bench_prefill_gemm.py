"""The float32 CPU prefill's linears: oneDNN against the module's BLAS call (pytest-benchmark).

    pytest benchmarks/bench_prefill_gemm.py --benchmark-only

The K600 model of the CPU study (6 x 384) over a 512-token prefill: every layer's
linears as ``PackedLinears`` runs them there (q/k/v, proj + residual, fc1 with
its LayerNorm and GELU, fc2 + residual; attention replaced by its value input,
so only the linears and what lies between them run), with
``NBP_PREFILL_GEMM=onednn`` (``nbp_kernels.prefill_gemm``: GELU and residual
add fused into oneDNN's product) against ``blas`` (``F.linear``, then torch's
GELU and add). FLOPs: 2 x rows x in x out; bytes: the weights and activations read
once. CPU only. The whole generation's prefill, side by side:
benchmarks/ablations/cpu_prefill_gemm.py.
"""
import pytest
import torch

from nbp import NBPTransformer, TransformerConfig
from nbp_kernels import prefill_gemm
from nbp_kernels.cpu_ops import PackedLinears
from suite import CUDA, record, run, smoke

pytestmark = pytest.mark.skipif(CUDA, reason="CPU prefill: the GPU run benchmarks the GPU paths")
WIDTH, LAYERS, ROWS = (64, 1, 40) if smoke() else (384, 6, 512)


@pytest.mark.parametrize("route", ["onednn", "blas"])
def test_prefill_layers(benchmark, floors, monkeypatch, route):
    if route == "onednn" and not prefill_gemm.is_available()[0]:
        pytest.skip(prefill_gemm.is_available()[1])
    monkeypatch.setenv(prefill_gemm.ENV, route)
    benchmark.group = f"prefill layers {LAYERS} x {WIDTH} rows={ROWS} fp32 " \
                      f"threads={torch.get_num_threads()}"
    torch.manual_seed(0)
    model = NBPTransformer(TransformerConfig(n_layer=LAYERS, n_head=WIDTH // 64,
                                             n_embd=WIDTH)).eval()
    linears = PackedLinears(model.blocks)
    x = torch.randn(1, ROWS, WIDTH)

    def attend(q, k, v, layer_idx):
        return v

    with torch.no_grad():
        run(benchmark, lambda: model.run_layers(x, attend, linears), 20)
    mods = list(linears.packed)
    record(benchmark, floors, op="prefill_gemm", impl=route,
           shape=f"prefill layers rows={ROWS} {LAYERS}x{WIDTH}", dtype=torch.float32,
           nbytes=sum(4 * (m.weight.numel() + ROWS * (m.in_features + m.out_features))
                      for m in mods),
           flops=sum(2 * ROWS * m.in_features * m.out_features for m in mods), rows=ROWS)
