"""The compiled CUDA module (no GPU needed): it imports, reports its archs, and
rejects bad arguments at the boundary before any CUDA call.

CI builds it first (``NBP_BUILD_CUDA=1 python setup.py build_ext --inplace``),
so there a missing module is a failure; elsewhere the module tests skip.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from nbp_kernels import cuda_ops

ALIGNED = 1 << 20  # a fake, 16-byte aligned device address: every call below fails its checks first
S3 = (1 << 16, 1 << 12, 96)


def _load_C():
    try:
        return importlib.import_module("nbp_kernels._C")
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but nbp_kernels._C is not built: {e}")
        pytest.skip(f"nbp_kernels._C is not built ({e}); {cuda_ops.BUILD_HINT}")


@pytest.fixture(scope="module")
def C():
    return _load_C()


def _decode_kwargs(**over):
    kw = dict(q=ALIGNED, q_strides=S3, k_cache=ALIGNED, k_cache_strides=S3, v_cache=ALIGNED,
              v_cache_strides=S3, k_new=0, k_new_strides=(0, 0, 0), v_new=0, v_new_strides=(0, 0, 0),
              out=ALIGNED, out_strides=S3, seq_lens=ALIGNED, batch=2, heads=4, L=16, max_seq=64,
              head_dim=96, dtype=2, scale=0.1, num_splits=1, part_o=0, part_o_numel=0, part_lse=0,
              part_lse_numel=0, stream=0)
    kw.update(over)
    return kw


def _append_kwargs(**over):
    kw = dict(k_cache=ALIGNED, k_cache_strides=S3, v_cache=ALIGNED, v_cache_strides=S3,
              k_new=ALIGNED, k_new_strides=S3, v_new=ALIGNED, v_new_strides=S3, seq_lens=ALIGNED,
              batch=2, heads=4, L=16, max_seq=64, head_dim=96, dtype=2, stream=0)
    kw.update(over)
    return kw


def test_module_reports_archs(C):
    info = C.build_info()
    assert {"sm_80", "sm_90a", "compute_90"} <= set(info["archs"]), info
    major, minor = (int(x) for x in info["cuda_runtime"].split("."))
    assert major >= 12 and minor >= 0
    assert cuda_ops.build_info() == info
    assert info["max_splits"] >= 1 and info["max_block_len"] == cuda_ops.MAX_BLOCK_LEN


@pytest.mark.parametrize("over, match", [
    (dict(dtype=7), "dtype"),
    (dict(head_dim=80), "head_dim"),
    (dict(L=0), "L: block length"),
    (dict(L=257, max_seq=1024), "L: block length"),
    (dict(max_seq=8), "max_seq"),
    (dict(batch=0), "batch"),
    (dict(q=0), "q: null"),
    (dict(k_cache=ALIGNED + 8), "k_cache: data pointer must be 16-byte aligned"),
    (dict(v_cache_strides=(1 << 16, 1 << 12, 97)), "v_cache: the seq stride"),
    (dict(out_strides=(-96, 96, 96)), "out: the batch stride"),
    (dict(k_new=ALIGNED, k_new_strides=S3), "k_new, v_new: pass both"),
    (dict(seq_lens=0), "seq_lens"),
    (dict(seq_lens=ALIGNED + 2), "seq_lens"),
    (dict(num_splits=0), "num_splits"),
    (dict(num_splits=65), "num_splits"),
    (dict(num_splits=4, part_o=ALIGNED, part_o_numel=10, part_lse=ALIGNED, part_lse_numel=1 << 20), "part_o"),
    (dict(num_splits=4, part_o=ALIGNED, part_o_numel=1 << 20, part_lse=ALIGNED, part_lse_numel=3), "part_lse"),
    (dict(scale=float("nan")), "scale"),
])
def test_decode_rejects_bad_arguments(C, over, match):
    with pytest.raises(ValueError, match=match):
        C.decode(**_decode_kwargs(**over))


@pytest.mark.parametrize("over, match", [
    (dict(dtype=-1), "dtype"),
    (dict(head_dim=36, dtype=1), "head_dim"),   # 72 bytes: not a multiple of 16
    (dict(k_new=ALIGNED + 4), "k_new: data pointer"),
    (dict(v_new_strides=(96, 96, 4)), "v_new: the seq stride"),
    (dict(L=0), "L: block length"),
    (dict(L=300, max_seq=256), "max_seq"),
    (dict(batch=65535, heads=4096, L=16, max_seq=1 << 20), "batch \\* heads \\* L"),
    (dict(seq_lens=0), "seq_lens"),
])
def test_append_rejects_bad_arguments(C, over, match):
    with pytest.raises(ValueError, match=match):
        C.append(**_append_kwargs(**over))


def test_num_splits_follows_the_shape(C):
    split = lambda B, H=16, L=16, M=1296, D=96, dt=2: C.num_splits(batch=B, heads=H, L=L, max_seq=M,
                                                                  head_dim=D, dtype=dt, num_sms=132)
    assert split(1) > split(8) >= 1, (split(1), split(8))
    assert split(8) * 8 * 16 <= 3 * 132      # one wave of resident CTAs at the 700M shape
    assert split(1, H=1, M=100) == 1          # too short to split
    assert split(1, H=1, L=1, M=10 ** 6) == C.build_info()["max_splits"]
    assert split(64, H=64, M=4096) == 1       # the batch alone fills the GPU
    assert split(1, L=40) <= split(1, L=16)   # more query tiles, fewer splits


@pytest.mark.parametrize("cap, archs, ok", [
    ((9, 0), ["sm_90a"], True),
    ((8, 6), ["sm_80"], True),
    ((8, 0), ["sm_90a", "compute_90"], False),
    ((10, 0), ["sm_80", "sm_90a", "compute_90"], True),
    ((10, 0), ["sm_80", "sm_90a"], False),
    ((7, 5), ["sm_80", "sm_90a", "compute_90"], False),
    ((9, 0), ["sm_80"], False),
])
def test_arch_supported(cap, archs, ok):
    assert cuda_ops.arch_supported(cap, archs) is ok


def test_unusable_on_cpu():
    ok, why = cuda_ops.is_available(torch.device("cpu"))
    assert not ok and "CUDA device" in why


def test_backend_rejects_cpu_and_mixed_dtypes():
    """The launch keeps its memory-safety checks (one dtype code, device pointers); the
    kernels' shape limits are checked once, when the registry resolves the op."""
    import nbp_kernels

    q = torch.zeros(1, 2, 16, 64, dtype=torch.bfloat16)
    cache = torch.zeros(1, 2, 32, 64, dtype=torch.bfloat16)
    lens = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_ops.block_decode_attention(q, cache, cache.clone(), lens)
    with pytest.raises(ValueError, match="k_cache: the cuda backend expects the same dtype"):
        cuda_ops.block_decode_attention(q, cache.float(), cache.float(), lens)
    with pytest.raises(ValueError, match="head_dim in"):
        nbp_kernels.block_decode_attention(q[..., :32], cache[..., :32], cache[..., :32].clone(), lens,
                                           backend="cuda")
    with pytest.raises(ValueError, match="CUDA tensors"):
        cuda_ops.kv_append_(cache, cache.clone(), q, q, lens)
    assert not hasattr(cuda_ops, "block_causal_attention")   # the registry falls back per op


def test_fake_impls_trace_without_a_gpu():
    """The fake kernels give shapes for torch.compile / capture planning (fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 4, 16, 96, dtype=torch.bfloat16, device="cuda")
        cache = torch.empty(2, 4, 100, 96, dtype=torch.bfloat16, device="cuda")
        lens = torch.zeros(2, dtype=torch.int32, device="cuda")
        out = torch.ops.nbp.cuda_block_decode_attention(q, cache, cache.clone(), lens, q, q, 0.1)
        torch.ops.nbp.cuda_kv_append(cache, cache.clone(), q, q, lens)
    assert out.shape == (2, 4, 16, 96) and out.dtype == torch.bfloat16 and out.device.type == "cuda"
