"""Block decode attention (split-KV, fused append) against nbp_kernels.reference: the
triton backend, and the cpu backend's C kernel on every ISA path this machine runs.

Checks the output, that the caches equal a clone with only the new block
written (nothing else touched), per-sequence lengths, independence from the
split count, and that nothing is written at or beyond max_seq.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpu_isa_paths import ISAS, force_isa
import nbp_kernels
from nbp.generate import FastGenerator
from nbp.reference import generate_tokens as reference_generate
from nbp_kernels import decode_attention_cpu, reference, registry
from nbp_kernels.torch_ops import block_decode_attention as torch_ops_decode
from nbp_kernels.registry import backend_status
from nbp_kernels.ops import block_decode_attention as triton_decode
from test_generate import CASES as GENERATE_CASES
from test_generate import inputs as generate_inputs
from test_generate import sharp_model
from test_kv_append import clipped_append

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_OK, _WHY = backend_status("triton", DEVICE)
needs_triton = pytest.mark.skipif(not _OK, reason=f"triton backend unusable: {_WHY}")

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32]

# (B, H, L, M, D): L in {1, 8, 16, 64}, odd cache sizes, head_dim 96 (+ 64, 128).
CPU_CASES = [(3, 2, 1, 37, 96), (2, 1, 8, 45, 96), (2, 2, 16, 53, 64), (1, 1, 64, 90, 128),
             (2, 1, 5, 29, 96)]
GPU_CASES = [(1, 16, 16, 1296, 96), (8, 16, 16, 1296, 96), (3, 4, 1, 2049, 128), (2, 8, 64, 777, 64),
             (2, 4, 256, 1500, 96), (4, 2, 8, 333, 96)]
CASES = GPU_CASES if CUDA else CPU_CASES


def _setup(B, H, L, M, D, dtype, new_dtype=None, seed=0, lens=None):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(DEVICE, dt)

    q, kc, vc = rnd(B, H, L, D), rnd(B, H, M, D), rnd(B, H, M, D)
    kn, vn = rnd(B, H, L, D, dt=new_dtype or dtype), rnd(B, H, L, D, dt=new_dtype or dtype)
    if lens is None:  # spread over [0, M - L], ends included
        lens = torch.linspace(0, M - L, B).round().int().tolist()[::-1]
    return q, kc, vc, kn, vn, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def _close(got, want, tol, what):
    err = (got.float() - want.float()).abs().max().item()
    bound = tol * max(1.0, want.float().abs().max().item())
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g}"


def _check(case, dtype, append=True, num_splits=None, new_dtype=None, seed=0, lens=None):
    q, kc, vc, kn, vn, sl = _setup(*case, dtype, new_dtype, seed, lens)
    if not append:
        kn = vn = None
    want_k, want_v = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, want_k, want_v, sl, k_new=kn, v_new=vn)
    if num_splits is None:
        out = nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn, backend="triton")
    else:
        out = triton_decode(q, kc, vc, sl, k_new=kn, v_new=vn, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, want, TOL[dtype], "out")
    # The whole caches equal a clone with only the block written: nothing else changed.
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}L{}M{}D{}".format(*c))
def test_matches_reference(case, dtype):
    _check(case, dtype)


@needs_triton
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: "B{}H{}L{}M{}D{}".format(*c))
def test_without_new_block(case):
    _check(case, torch.float32, append=False)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_split_counts_agree(num_splits):
    """Every split count gives the reference result (the reduction is exact up to rounding)."""
    _check(CASES[1], torch.float32, num_splits=num_splits, seed=num_splits)


@needs_triton
@pytest.mark.skipif(not CUDA, reason="fp16/bf16 kernels need a GPU (the interpreter runs fp32 only here)")
def test_bf16_cache_fp16_queries():
    """Queries in another dtype than the cache: the output follows q, the cache keeps its dtype."""
    q, kc, vc, kn, vn, sl = _setup(2, 4, 16, 300, 96, torch.bfloat16, seed=5)
    q = q.half()
    want_k, want_v = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, want_k, want_v, sl, k_new=kn, v_new=vn)
    out = nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn, backend="triton")
    assert out.dtype == torch.float16
    _close(out, want, TOL[torch.bfloat16], "out")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@needs_triton
def test_new_block_cast_to_cache_dtype():
    """fp16 new keys go into an fp32 cache; attention sees the cache's (rounded) values."""
    _check(CASES[0], torch.float32, new_dtype=torch.float16)


@needs_triton
def test_single_sequence_lengths_edge():
    """Empty cache (seq_len 0) and a cache filled up to max_seq exactly."""
    B, H, L, M, D = 2, 1, 8, 40, 96
    _check((B, H, L, M, D), torch.float32, lens=[0, M - L], num_splits=3)


@needs_triton
def test_no_write_at_or_beyond_max_seq():
    """With the host check skipped, an overflowing block is clipped at max_seq.

    The cache is a slice of a larger buffer, so a stray write past max_seq
    would land in the buffer's tail, which must stay untouched.
    """
    B, H, L, M, D = 2, 1, 8, 20, 64
    q, kc, vc, kn, vn, _ = _setup(B, H, L, M, D, torch.float32)
    kbuf, vbuf = torch.zeros(B, H, M + 16, D, device=DEVICE), torch.zeros(B, H, M + 16, D, device=DEVICE)
    sl = torch.tensor([M - 3, 2], dtype=torch.int32, device=DEVICE)
    nbp_kernels.block_decode_attention(q, kbuf[:, :, :M], vbuf[:, :, :M], sl, k_new=kn, v_new=vn,
                                       backend="triton", check_bounds=False)
    assert not kbuf[:, :, M:].any() and not vbuf[:, :, M:].any()
    assert torch.equal(kbuf[0, :, M - 3:M], kn[0, :, :3]) and torch.equal(kbuf[1, :, 2:2 + L], kn[1])


@needs_triton
@settings(max_examples=5, deadline=None)
@given(B=st.integers(1, 3), L=st.sampled_from([1, 3, 8, 16]), extra=st.integers(0, 40),
       D=st.sampled_from([64, 96]), splits=st.integers(0, 4), append=st.booleans(),
       seed=st.integers(0, 1000))
def test_random_shapes(B, L, extra, D, splits, append, seed):
    M = L + extra
    lens = torch.randint(0, M - L + 1, (B,), generator=torch.Generator().manual_seed(seed)).tolist()
    _check((B, 1, L, M, D), torch.float32, append=append, num_splits=splits, seed=seed, lens=lens)


@needs_triton
def test_bad_inputs_raise():
    q, kc, vc, kn, vn, sl = _setup(1, 1, 4, 10, 64, torch.float32)
    with pytest.raises(ValueError, match="cache overflow"):
        nbp_kernels.block_decode_attention(q, kc, vc, sl + 8, k_new=kn, v_new=vn, backend="triton")
    with pytest.raises(ValueError, match="seq_lens"):
        nbp_kernels.block_decode_attention(q, kc, vc, sl.long(), backend="triton")
    with pytest.raises(ValueError, match="k_new, v_new"):
        nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, backend="triton")
    with pytest.raises(ValueError, match="num_splits"):
        triton_decode(q, kc, vc, sl, num_splits=-1)
    big = torch.zeros(1, 1, 4, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        nbp_kernels.block_decode_attention(big, torch.zeros(1, 1, 10, 512, device=DEVICE),
                                           torch.zeros(1, 1, 10, 512, device=DEVICE), sl,
                                           backend="triton")


@pytest.mark.parametrize("lens", [[-3, 5], [17, 20], [-1, -1], [30, 0]])
def test_torch_fused_append_unchecked_writes_only_the_block(lens):
    """The torch backend's fused append with check_bounds=False keeps the kernels' rule:
    negative lengths write nothing, an overflow is clipped at max_seq, k and v alike."""
    B, H, L, M, D = 2, 2, 4, 20, 64
    q, kc, vc, kn, vn, _ = _setup(B, H, L, M, D, torch.float32, seed=3)
    want_k, want_v = clipped_append(kc, vc, kn, vn, lens)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn, backend="torch",
                                       check_bounds=False)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


# ---- the cpu backend (nbp_kernels/cpu/decode_attention.c), every ISA path this machine runs ----


# (B, H, L, M, D, lens): odd cache sizes, head_dim 96 / 40 / 128, L not dividing anything,
# lengths 0 and M - L in one batch, several chunks of keys, the K600 decode shape.
CPU_KERNEL_CASES = [
    (3, 2, 1, 37, 96, None), (2, 1, 8, 45, 96, [0, 37]), (2, 2, 16, 53, 64, None),
    (1, 1, 64, 90, 128, None), (2, 1, 5, 29, 96, None), (3, 2, 5, 131, 40, [0, 126, 61]),
    (2, 3, 16, 201, 64, [185, 0]), (1, 6, 16, 1281, 64, [900]), (2, 2, 3, 67, 24, [64, 1]),
]


def _case_id(c):
    return "B{}H{}L{}M{}D{}".format(*c[:5])


@pytest.fixture(params=ISAS)
def cpu_kernel(request, monkeypatch):
    """The cpu backend's kernel compiled for one ISA (NBP_CPU_ISA forces it), for every
    block length (by default blocks under MIN_ROWS queries take the torch backend)."""
    monkeypatch.setattr(decode_attention_cpu, "MIN_ROWS", 1)
    return force_isa(monkeypatch, request.param, decode_attention_cpu.is_available)


@pytest.fixture
def threads():
    """Sets torch's (and the kernels') thread count for one test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _cpu_inputs(B, H, L, M, D, lens, seed=0, strided=True):
    """q, k_new, v_new as split_heads views of one [B, L, 3 H D] tensor (as the model
    passes them) or contiguous; the caches as views [:, :, :M] of longer buffers (as
    StaticKVCache.layer gives them), whose tails must stay untouched."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        qkv = torch.randn(B, L, 3, H, D, generator=g)
        q, kn, vn = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, kn, vn = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    kbuf, vbuf = torch.randn(B, H, M + 5, D, generator=g), torch.randn(B, H, M + 5, D, generator=g)
    if lens is None:
        lens = torch.linspace(0, M - L, B).round().int().tolist()[::-1]
    return q, kn, vn, kbuf, vbuf, torch.tensor(lens, dtype=torch.int32)


def _check_cpu(case, append=True, strided=True, seed=0):
    B, H, L, M, D, lens = case
    q, kn, vn, kbuf, vbuf, sl = _cpu_inputs(B, H, L, M, D, lens, seed, strided)
    kc, vc = kbuf[:, :, :M], vbuf[:, :, :M]
    if not append:
        kn = vn = None
    want_kbuf, want_vbuf = kbuf.clone(), vbuf.clone()
    want = reference.block_decode_attention(q, want_kbuf[:, :, :M], want_vbuf[:, :, :M], sl,
                                            k_new=kn, v_new=vn)
    out = nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn, backend="cpu")
    assert out.shape == q.shape and out.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous()   # [B, L, H, D] underneath: merging heads is free
    _close(out, want, TOL[torch.float32], "out")
    # The whole buffers equal a clone with only the block written: nothing else changed.
    assert torch.equal(kbuf, want_kbuf) and torch.equal(vbuf, want_vbuf)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("case", CPU_KERNEL_CASES, ids=_case_id)
def test_cpu_matches_reference(case):
    _check_cpu(case)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("case", CPU_KERNEL_CASES[:4] + CPU_KERNEL_CASES[5:6], ids=_case_id)
def test_cpu_without_new_block_and_contiguous_inputs(case):
    _check_cpu(case, append=False, seed=1)
    _check_cpu(case, strided=False, seed=2)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("case", [CPU_KERNEL_CASES[2], CPU_KERNEL_CASES[6], (1, 1, 16, 300, 96, [250])],
                         ids=_case_id)
def test_cpu_thread_counts_agree(case, n_threads, threads):
    """One (b, h) pair with 2 or 3 threads splits its keys; every count gives the reference."""
    threads(n_threads)
    _check_cpu(case, seed=n_threads)


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 40])
def test_cpu_key_splits_agree(splits, monkeypatch):
    """Any split count gives the reference, more splits than chunks of keys included."""
    monkeypatch.setattr(decode_attention_cpu, "splits_for", lambda pairs, threads, chunks: splits)
    _check_cpu((2, 2, 5, 301, 64, [0, 280]), seed=splits)
    _check_cpu((1, 1, 16, 150, 96, [100]), append=False, seed=splits)


def test_cpu_split_rule():
    assert decode_attention_cpu.splits_for(6, 2, 20) == 1     # shares out evenly
    assert decode_attention_cpu.splits_for(1, 2, 20) == 2
    assert decode_attention_cpu.splits_for(6, 4, 20) == 2     # 12 items over 4 threads
    assert decode_attention_cpu.splits_for(1, 16, 5) == 5     # at most one split per chunk
    assert decode_attention_cpu.splits_for(9, 2, 20) == 1     # >= 4 per thread
    assert decode_attention_cpu.splits_for(3, 2, 1) == 1


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("lens", [[-3, 5], [17, 20], [-1, -1], [30, 0], [-4, 16]])
def test_cpu_fused_append_unchecked_writes_only_the_block(lens):
    """check_bounds=False: negative lengths write nothing, an overflow is clipped at max_seq
    (the buffer past it untouched), k and v alike; the rows attend to positions
    < seq_lens + L capped at max_seq as the torch backend does, zeros without any."""
    B, H, L, M, D = 2, 2, 4, 20, 64
    q, kn, vn, kbuf, vbuf, sl = _cpu_inputs(B, H, L, M, D, lens, seed=3)
    tails = kbuf[:, :, M:].clone(), vbuf[:, :, M:].clone()
    want_k, want_v = clipped_append(kbuf[:, :, :M], vbuf[:, :, :M], kn, vn, lens)
    want = nbp_kernels.block_decode_attention(q, want_k.clone(), want_v.clone(), sl,
                                              backend="torch", check_bounds=False)
    out = nbp_kernels.block_decode_attention(q, kbuf[:, :, :M], vbuf[:, :, :M], sl, k_new=kn,
                                             v_new=vn, backend="cpu", check_bounds=False)
    assert torch.equal(kbuf[:, :, :M], want_k) and torch.equal(vbuf[:, :, :M], want_v)
    assert torch.equal(kbuf[:, :, M:], tails[0]) and torch.equal(vbuf[:, :, M:], tails[1])
    for b, s in enumerate(lens):
        if s + L > 0:
            _close(out[b], want[b], TOL[torch.float32], f"out[{b}]")
        else:
            assert not out[b].any()


@pytest.mark.usefixtures("cpu_kernel")
def test_cpu_other_dtypes_take_the_torch_path():
    """float32 queries with a bfloat16 cache and new block: the cpu backend's launcher hands
    them to the torch backend (the C kernel is float32 only); same semantics."""
    B, H, L, M, D, lens = 2, 2, 4, 33, 64, [0, 29]
    q, kn, vn, kbuf, vbuf, sl = _cpu_inputs(B, H, L, M, D, lens, seed=4)
    kc, vc, kn, vn = kbuf[:, :, :M].bfloat16(), vbuf[:, :, :M].bfloat16(), kn.bfloat16(), vn.bfloat16()
    want_k, want_v = kc.clone(), vc.clone()
    want = reference.block_decode_attention(q, want_k, want_v, sl, k_new=kn, v_new=vn)
    out = nbp_kernels.block_decode_attention(q, kc, vc, sl, k_new=kn, v_new=vn, backend="cpu")
    _close(out, want, TOL[torch.float32], "out")
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.usefixtures("cpu_kernel")
def test_cpu_wrapper_still_validates():
    q, kn, vn, kbuf, vbuf, sl = _cpu_inputs(1, 1, 4, 10, 64, [0])
    with pytest.raises(ValueError, match="cache overflow"):
        nbp_kernels.block_decode_attention(q, kbuf[:, :, :10], vbuf[:, :, :10], sl + 8, k_new=kn,
                                           v_new=vn, backend="cpu")


@pytest.mark.usefixtures("cpu_kernel")
def test_cpu_queries_with_strided_head_dim_are_copied():
    """A q whose last dimension is not contiguous is copied for the kernel, not misread."""
    q, kn, vn, kbuf, vbuf, sl = _cpu_inputs(2, 2, 5, 40, 64, [0, 35], seed=5)
    q = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)   # D stride L
    assert q.stride(-1) != 1
    want = reference.block_decode_attention(q, kbuf[:, :, :40].clone(), vbuf[:, :, :40].clone(), sl,
                                            k_new=kn, v_new=vn)
    out = nbp_kernels.block_decode_attention(q, kbuf[:, :, :40], vbuf[:, :, :40], sl, k_new=kn,
                                             v_new=vn, backend="cpu")
    _close(out, want, TOL[torch.float32], "out")


@pytest.mark.usefixtures("cpu_kernel")
@pytest.mark.parametrize("preset, mode, cond, cfg_scale", GENERATE_CASES[:3] + GENERATE_CASES[5:6])
def test_generator_decodes_through_the_cpu_kernel(preset, mode, cond, cfg_scale, monkeypatch):
    """FastGenerator's auto backend on a float32 CPU model runs its decode steps through the
    cpu kernel (Python-driven steps: blocks of 1 query, NTP, through the torch backend,
    MIN_ROWS; C-driven steps, the default, call the kernel for every block), and its
    greedy tokens equal the torch backend's and the reference's."""
    model = sharp_model(preset)
    ids = generate_inputs(model.config, mode, cond)
    kw = dict(cond_len=cond, mode=mode, do_sample=False, cfg_scale=cfg_scale, cfg_schedule="linear")
    assert registry.resolved_backend("block_decode_attention", device="cpu", dtype=torch.float32,
                                     head_dim=model.config.head_dim, block_size=1) == "cpu"
    ran = []
    takes = decode_attention_cpu._kernel_takes

    def spy(q, *args):
        ran.append((q.shape[2], takes(q, *args)))
        return ran[-1][1]
    monkeypatch.setattr(decode_attention_cpu, "_kernel_takes", spy)
    monkeypatch.setattr(decode_attention_cpu, "MIN_ROWS", 4)
    gen = FastGenerator(model)
    gen.decode_programs = False
    got = gen.generate_tokens(ids, 16, **kw)
    assert ran and all(took == (rows >= 4) for rows, took in ran)   # C for blocks of >= 4 rows
    assert any(took for _, took in ran) == (mode != "ntp")
    torch_tokens = FastGenerator(model, backend="torch").generate_tokens(ids, 16, **kw)
    assert torch.equal(got, torch_tokens)
    assert torch.equal(got, reference_generate(model, ids, 16, **kw))
    ran.clear()
    assert torch.equal(FastGenerator(model).generate_tokens(ids, 16, **kw), got)
    assert not ran   # every decode step was one C call


def test_cpu_blocks_of_few_rows_take_the_torch_backend(monkeypatch):
    """Under MIN_ROWS queries the cpu backend hands the call to the torch backend (measured
    faster there); the result and the append are the same."""
    called = []
    monkeypatch.setattr(decode_attention_cpu.torch_ops, "block_decode_attention",
                        lambda *a, **k: called.append(1) or torch_ops_decode(*a, **k))
    q, kn, vn, kbuf, vbuf, sl = _cpu_inputs(2, 2, decode_attention_cpu.MIN_ROWS - 1, 30, 64, [0, 20])
    want_k, want_v = kbuf[:, :, :30].clone(), vbuf[:, :, :30].clone()
    want = reference.block_decode_attention(q, want_k, want_v, sl, k_new=kn, v_new=vn)
    out = decode_attention_cpu.block_decode_attention(q, kbuf[:, :, :30], vbuf[:, :, :30], sl,
                                                      k_new=kn, v_new=vn)
    assert called
    _close(out, want, TOL[torch.float32], "out")
    assert torch.equal(kbuf[:, :, :30], want_k) and torch.equal(vbuf[:, :, :30], want_v)
