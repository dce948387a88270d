"""The ``torch`` backend's block-causal attention against nbp_kernels.reference, forward and
backward, at lengths where the CPU path splits the queries into chunks that each read only
the keys they can see (``torch_ops.CPU_QUERY_CHUNK``), and below it."""
import pytest
import torch

import nbp_kernels
from nbp_kernels import reference, torch_ops

# (B, H, S, D, block_size, cond_len, hybrid): odd S, S not a multiple of the block or of
# the chunk, condition prefixes, hybrid layout, one chunk exactly, under one chunk
CASES = [
    (1, 2, 517, 32, 16, 0, False),
    (2, 1, 301, 96, 7, 5, True),
    (1, 1, 600, 16, 1, 0, False),
    (1, 1, 300, 16, 300, 0, False),
    (1, 1, 290, 16, 16, 290, False),
    (1, 1, torch_ops.CPU_QUERY_CHUNK, 16, 16, 3, False),
    (1, 2, 37, 96, 5, 3, False),
]


def _case_id(c) -> str:
    return str(c) if isinstance(c, int) else "B{}H{}S{}D{}L{}c{}{}".format(
        *c[:6], "h" if c[6] else "")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_torch_backend_matches_reference(case):
    B, H, S, D, bs, cond, hybrid = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).requires_grad_() for _ in range(3))
    kw = dict(block_size=bs, cond_len=cond, hybrid=hybrid)
    out = nbp_kernels.block_causal_attention(q, k, v, backend="torch", **kw)
    want = reference.block_causal_attention(q, k, v, **kw)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    do = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), do),
                    torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_mask_plan_chunks_read_only_visible_keys():
    cpu = torch.device("cpu")
    mask, chunks = torch_ops._mask_plan(517, 517, 16, 0, False, cpu)
    C = torch_ops.CPU_QUERY_CHUNK   # a multiple of the block: each chunk ends on a block
    assert chunks == tuple((q0, min(q0 + C, 517), min(q0 + C, 517)) for q0 in range(0, 517, C))
    for q0, q1, n in chunks:
        assert not mask[q0:q1, n:].any()
    assert torch_ops._mask_plan(C, C, 16, 0, False, cpu)[1] is None
    # a float query's mask is additive: 0 where the boolean one is True, -inf elsewhere
    additive, same = torch_ops._mask_plan(517, 517, 16, 0, False, cpu, torch.float32)
    assert same == chunks and additive.dtype == torch.float32
    assert torch.equal(additive == 0, mask) and torch.isinf(additive[~mask]).all()


# (Sq, case): the last rows of a prefill's last layer: one block, part of a block, more
# rows than a CPU chunk holds, all rows
LAST_ROWS = [(16, CASES[0]), (3, CASES[1]), (1, CASES[2]), (300, CASES[2]), (37, CASES[6])]


@pytest.mark.parametrize("sq,case", LAST_ROWS, ids=_case_id)
def test_last_rows_attention_is_the_last_rows_of_the_reference(sq, case):
    B, H, S, D, bs, cond, hybrid = case
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    kw = dict(block_size=bs, cond_len=cond, hybrid=hybrid)
    out = torch_ops.last_rows_attention(q[:, :, S - sq:], k, v, **kw)
    want = reference.block_causal_attention(q, k, v, **kw)[:, :, S - sq:]
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_last_rows_attention_rejects_more_queries_than_keys():
    q, k = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="q: expected"):
        torch_ops.last_rows_attention(q, k, k, block_size=4)
