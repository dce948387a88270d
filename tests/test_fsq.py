"""FSQ: the published quantizer's grid, index layout and round trips."""
import math

import numpy as np
import pytest
import torch

from nbp.fsq import FSQ

LEVELS = (8, 8, 8, 5, 5, 5)


@pytest.fixture(scope="module")
def fsq():
    return FSQ(LEVELS)


def _grid(levels):
    """Allowed normalised values per channel: (digit - l//2) / (l//2) for digit in [0, l)."""
    return [torch.tensor([(d - l // 2) / (l // 2) for d in range(l)]) for l in levels]


def test_published_constants(fsq):
    assert fsq.codebook_size == 64000
    assert fsq.basis == (1, 8, 64, 512, 2560, 12800)
    assert fsq.dim == 6


def test_all_indices_round_trip(fsq):
    idx = torch.arange(64000)
    codes = fsq.indices_to_codes(idx)
    assert codes.shape == (64000, 6) and codes.dtype == torch.float32
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # indices -> codes is injective, so codes -> indices -> codes is the identity too.
    assert torch.unique(codes, dim=0).shape[0] == 64000
    assert torch.equal(fsq.indices_to_codes(fsq.codes_to_indices(codes)), codes)


def test_index_is_mixed_radix_first_channel_fastest(fsq):
    idx = torch.arange(64000)
    digits = np.stack(np.unravel_index(idx.numpy(), LEVELS, order="F"), axis=-1)
    half = np.array([l // 2 for l in LEVELS])
    expected = (digits - half) / half
    assert np.array_equal(fsq.indices_to_codes(idx).numpy(), expected.astype(np.float32))


def test_quantize_lands_on_grid_and_uses_every_level(fsq):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50000, 6, generator=g) * 3
    q = fsq.quantize(z)
    for d, allowed in enumerate(_grid(LEVELS)):
        values = torch.unique(q[:, d])
        assert torch.equal(values, allowed), (d, values)


def test_quantize_matches_float64_formula(fsq):
    """bound(z) = tanh(z + tan(offset / half_l)) * half_l - offset, eps = 1e-3 (published)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4000, 6, generator=g) * 2
    lv = np.array(LEVELS, dtype=np.float64)
    half_l = (lv - 1) * (1 - 1e-3) / 2
    offset = np.where(lv % 2 == 0, 0.5, 0.0)
    bound = np.tanh(z.double().numpy() + np.tan(offset / half_l)) * half_l - offset
    assert np.allclose(fsq.bound(z).numpy(), bound, atol=1e-5)
    # Compare the rounded values away from rounding ties (float32 vs float64).
    safe = np.abs(bound - np.round(bound)) < 0.49
    expected = np.round(bound) / (lv // 2)
    assert np.array_equal(fsq.quantize(z).numpy()[safe], expected[safe].astype(np.float32))
    # z = 0 maps to digit l // 2, i.e. the normalised value 0, for every level.
    assert torch.equal(fsq.quantize(torch.zeros(1, 6)), torch.zeros(1, 6))


def test_straight_through_gradient(fsq):
    z = torch.randn(64, 6, dtype=torch.float32, requires_grad=True)
    fsq.quantize(z).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (fsq.bound(z2) / torch.tensor([l // 2 for l in LEVELS])).sum().backward()
    assert torch.allclose(z.grad, z2.grad)
    assert z.grad.abs().min() > 0


def test_forward_channel_first(fsq):
    z = torch.randn(2, 6, 3, 4, 5)
    codes, idx = fsq(z)
    assert codes.shape == z.shape and idx.shape == (2, 3, 4, 5) and idx.dtype == torch.int64
    assert torch.equal(idx, fsq.codes_to_indices(codes.movedim(1, -1)))
    assert torch.equal(codes, fsq.quantize(z.movedim(1, -1)).movedim(-1, 1))


@pytest.mark.parametrize("levels", [(4, 4, 4), (3, 5), (2, 7, 6)])
def test_other_levels_round_trip(levels):
    q = FSQ(levels)
    idx = torch.arange(math.prod(levels))
    assert torch.equal(q.codes_to_indices(q.indices_to_codes(idx)), idx)
    z = torch.randn(5000, len(levels)) * 3
    for d, allowed in enumerate(_grid(levels)):
        assert torch.equal(torch.unique(q.quantize(z)[:, d]), allowed)


def test_bad_inputs(fsq):
    with pytest.raises(ValueError, match="levels"):
        FSQ([8, 1])
    with pytest.raises(ValueError, match="levels"):
        FSQ([])
    with pytest.raises(ValueError, match=r"z: expected a tensor \[\.\.\., 6\]"):
        fsq.quantize(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 64000\)"):
        fsq.indices_to_codes(torch.tensor([0, 64000]))
    with pytest.raises(ValueError, match=r"indices: expected values in \[0, 64000\)"):
        fsq.indices_to_codes(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        fsq.indices_to_codes(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="not on the FSQ grid"):
        fsq.codes_to_indices(torch.full((1, 6), 0.1))
    with pytest.raises(ValueError, match="outside the FSQ range"):
        fsq.codes_to_indices(torch.tensor([[1.0, 0, 0, 0, 0, 0]]))  # 8 levels: +1 is not a value
    with pytest.raises(ValueError, match=r"z: expected \[batch, 6"):
        fsq(torch.zeros(1, 5, 2))
