"""The video tokenizer (pytest-benchmark): ``VideoTokenizer.encode`` and ``decode``.

    pytest benchmarks/bench_tokenizer.py --benchmark-only

K600 frame prediction's tokenizer work: encode the given 5 frames (2 latent
frames) and decode the 17 frames of the whole 5-frame latent grid. CUDA runs
the published-size tokenizer (preset "magvit2", random weights, bf16, 128x128
frames); a CPU the "tiny" preset (same topology, 8/16 channels) in float32 at
64x64. Bytes: the video and the codes once; FLOPs: counted by
``torch.utils.flop_counter`` (convolutions and matmuls).
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nbp.tokenizer import TokenizerConfig, VideoTokenizer
from suite import CUDA, DEVICE, DTYPE, nbytes, record, run, smoke

PRESET = "magvit2" if CUDA and not smoke() else "tiny"
SIDE = 128 if CUDA and not smoke() else (32 if smoke() else 64)
GIVEN_FRAMES, ALL_FRAMES = 5, 17


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerConfig.from_preset(PRESET)).to(device=DEVICE, dtype=DTYPE).eval()


def _flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _bench(benchmark, floors, fn, what: str, moved: int, shape: str) -> None:
    with torch.no_grad():
        flops = _flops(fn)
        run(benchmark, fn, 5)
    record(benchmark, floors, op=f"tokenizer_{what}", impl=PRESET, shape=shape, dtype=DTYPE, nbytes=moved,
           flops=flops)


def test_tokenizer_encode(benchmark, floors, tokenizer):
    benchmark.group = f"tokenizer {PRESET} {SIDE}x{SIDE} {DTYPE}"
    g = torch.Generator(DEVICE).manual_seed(0)
    video = torch.rand(1, 3, GIVEN_FRAMES, SIDE, SIDE, device=DEVICE, generator=g)
    codes = tokenizer.encode(video)
    _bench(benchmark, floors, lambda: tokenizer.encode(video), "encode", nbytes(video, codes),
           f"video 1x3x{GIVEN_FRAMES}x{SIDE}x{SIDE} -> codes {tuple(codes.shape)}")


def test_tokenizer_decode(benchmark, floors, tokenizer):
    benchmark.group = f"tokenizer {PRESET} {SIDE}x{SIDE} {DTYPE}"
    t, h, w = tokenizer.config.latent_shape(ALL_FRAMES, SIDE, SIDE)
    g = torch.Generator(DEVICE).manual_seed(0)
    codes = torch.randint(0, tokenizer.codebook_size, (1, t, h, w), device=DEVICE, generator=g)
    video = tokenizer.decode(codes)
    _bench(benchmark, floors, lambda: tokenizer.decode(codes), "decode", nbytes(video, codes),
           f"codes {tuple(codes.shape)} -> video {tuple(video.shape)}")
