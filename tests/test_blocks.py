"""nbp.blocks: raster <-> block-major token order."""
import pytest
import torch

from nbp.blocks import block_order, from_block_order, to_block_order


@pytest.mark.parametrize("block", [(1, 1, 4), (1, 2, 2), (2, 2, 2), (2, 1, 4), (1, 4, 4), (2, 4, 4)])
def test_blocks_are_contiguous_boxes_and_the_inverse_restores_raster(block):
    t, h, w = 2, 4, 4
    codes = torch.arange(t * h * w).view(1, t, h, w)
    tokens = to_block_order(codes, block)
    L = block[0] * block[1] * block[2]
    for chunk in tokens.view(-1, L):  # every run of L tokens is one T x H x W box
        tt, hh, ww = chunk // (h * w), chunk // w % h, chunk % w
        assert (tt.max() - tt.min() + 1, hh.max() - hh.min() + 1, ww.max() - ww.min() + 1) == block
    assert torch.equal(from_block_order(tokens, (t, h, w), block), codes)


def test_row_blocks_are_the_identity():
    assert torch.equal(block_order((5, 16, 16), (1, 1, 16)), torch.arange(1280))


def test_block_that_does_not_tile_raises():
    with pytest.raises(ValueError, match="does not tile"):
        block_order((5, 16, 16), (2, 1, 16))
