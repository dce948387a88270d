"""FastGenerator(weight_dtype=...): bfloat16 / int8 weights through the packed CPU linear,
against a float32 model whose weights are their dequantized values
(``nbp_kernels.reference.quantize_weight`` / ``dequantized_linear``)."""
from __future__ import annotations

import copy

import pytest
import torch

from cpu_isa_paths import ISAS, force_isa
from nbp.config import TransformerConfig
from nbp.generate import FastGenerator
from nbp.model import NBPTransformer
from nbp.reference import generate_tokens as reference_generate
from nbp_kernels import reference
from nbp_kernels.cpu_ops import PackedLinears
from nbp_kernels.packed_linear import is_available

NARROW = [torch.bfloat16, torch.int8]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Every ISA path this machine runs (an AVX-512 machine tests AVX2 too)."""
    return force_isa(monkeypatch, request.param, is_available)


def sharp_model(preset: str = "tiny", seed: int = 0) -> NBPTransformer:
    """A tiny random model with weights scaled up, so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = NBPTransformer(TransformerConfig.from_preset(preset)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model


def dequantized_model(model: NBPTransformer, dtype: torch.dtype) -> NBPTransformer:
    """A copy of ``model`` whose linear weights are their values stored at ``dtype``, in float32."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, torch.nn.Linear):
                stored, scale = reference.quantize_weight(m.weight, dtype)
                w = stored.float()
                m.weight.copy_(w if scale is None else w * scale[:, None])
    return out


def video_ids(cfg: TransformerConfig, blocks: int = 2, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(cfg.video_offset, cfg.vocab_size, (batch, blocks * cfg.block_size),
                         generator=g)


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_every_linear_matches_dequantized_reference(dtype):
    """Each packed linear (decode rows and a prefill-sized product) computes
    ``reference.dequantized_linear`` of its stored weight; the model keeps float32 weights."""
    model = sharp_model()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    gen = FastGenerator(model, weight_dtype=dtype)
    assert isinstance(gen.linear, PackedLinears) and gen.weight_dtype == dtype
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(gen.linear.packed) == len(linears) and model.head in gen.linear.packed
    for m in linears:
        stored, scale = reference.quantize_weight(m.weight.detach(), dtype)
        for rows in (1, 16, 40):
            x = torch.randn(rows, m.in_features, generator=torch.Generator().manual_seed(rows))
            want = reference.dequantized_linear(x.double(), stored, scale,
                                                None if m.bias is None else m.bias.double())
            got = gen.linear(m, x)
            assert got.dtype == torch.float32 and got.shape == (rows, m.out_features)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, weights[n]), n


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("mode", ["nbp", "ntp"])
@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_greedy_tokens_equal_dequantized_model(dtype, mode):
    """Greedy tokens with narrow weights equal the reference generator's on the float32 model
    holding the dequantized weights (the sharp model keeps its choices away from ties)."""
    model = sharp_model()
    ids = video_ids(model.config)
    ref = reference_generate(dequantized_model(model, dtype), ids, 32, mode=mode, do_sample=False)
    fast = FastGenerator(model, weight_dtype=dtype).generate_tokens(ids, 32, mode=mode,
                                                                    do_sample=False)
    assert torch.equal(fast, ref)


def test_narrow_weights_change_the_logits_used():
    """A control for the test above: the dequantized int8 model differs from the float32 one,
    so equal tokens are not equal by accident of identical weights."""
    model = sharp_model()
    q = dequantized_model(model, torch.int8)
    assert not torch.equal(q.head.weight, model.head.weight)


def test_float32_weight_dtype_is_the_default():
    model = sharp_model()
    for wd in (None, torch.float32):
        gen = FastGenerator(model, weight_dtype=wd, packed_linear=False)
        assert gen.weight_dtype is None


@pytest.mark.parametrize("bad", ["int8", torch.float16, torch.int32, 8])
def test_unknown_weight_dtype_is_refused(bad):
    with pytest.raises(ValueError, match="weight_dtype: expected None, torch.float32"):
        FastGenerator(sharp_model(), weight_dtype=bad)


@pytest.mark.parametrize("dtype", NARROW, ids=str)
def test_narrow_weights_need_the_packed_cpu_linear(dtype, monkeypatch):
    """Refused, naming weight_dtype, before the model is cast: with a bfloat16 generator, with
    packed_linear=False, and where the kernel cannot run (NBP_CPU_ISA=off)."""
    model = sharp_model()
    with pytest.raises(ValueError, match="weight_dtype: .* need the packed CPU linear"):
        FastGenerator(model, dtype=torch.bfloat16, weight_dtype=dtype)
    assert next(model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="weight_dtype: .*packed_linear=False"):
        FastGenerator(model, weight_dtype=dtype, packed_linear=False)
    monkeypatch.setenv("NBP_CPU_ISA", "off")
    with pytest.raises(ValueError, match="weight_dtype: .*NBP_CPU_ISA=off"):
        FastGenerator(model, weight_dtype=dtype)
