"""VideoTokenizer: published layout, shapes, causality, errors, native save/load."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nbp.config import ConfigError
from nbp.tokenizer import (DepthToSpace3D, GroupNorm3D, TokenizerConfig, VideoTokenizer,
                           TOKENIZER_PRESETS)

# The published constructor (nbp/magvit2.py, VideoTokenizer.__init__ with
# embed_dim=6), transcribed layer by layer: ("conv", in, out) CausalConv3d
# 3x3x3, ("unit", in, out) ResidualUnit, ("d2s",), ("norm", c) GroupNorm3D,
# ("swish", c), ("proj", in, out) plain nn.Conv3d 1x1x1.
_U = "unit"
PUBLISHED_ENCODER = [
    ("conv", 3, 128), *[(_U, 128, 128)] * 4, ("conv", 128, 128),
    (_U, 128, 256), *[(_U, 256, 256)] * 3, ("conv", 256, 256),
    *[(_U, 256, 256)] * 4, ("conv", 256, 256),
    (_U, 256, 512), *[(_U, 512, 512)] * 3, *[(_U, 512, 512)] * 4,
    ("norm", 512), ("swish", 512), ("proj", 512, 6),
]
PUBLISHED_DECODER = [
    ("conv", 6, 512), *[(_U, 512, 512)] * 4, *[(_U, 512, 512)] * 4,
    ("conv", 512, 4096), ("d2s",),
    (_U, 512, 256), *[(_U, 256, 256)] * 3, ("conv", 256, 2048), ("d2s",),
    *[(_U, 256, 256)] * 4, ("conv", 256, 1024), ("d2s",),
    (_U, 256, 128), *[(_U, 128, 128)] * 3,
    ("norm", 128), ("swish", 128), ("conv", 128, 3),
]


def _published_keys(prefix, spec):
    keys = {}
    for i, (kind, *ch) in enumerate(spec):
        p = f"{prefix}.{i}."
        if kind == "conv":
            keys[p + "conv.weight"] = (ch[1], ch[0], 3, 3, 3)
            keys[p + "conv.bias"] = (ch[1],)
        elif kind == "proj":
            keys[p + "weight"] = (ch[1], ch[0], 1, 1, 1)
            keys[p + "bias"] = (ch[1],)
        elif kind == "norm":
            keys[p + "weight"] = keys[p + "bias"] = (ch[0],)
        elif kind == "swish":
            keys[p + "beta"] = (1, ch[0], 1, 1, 1)
        elif kind == _U:
            a, b = ch
            keys.update({p + "fn.0.weight": (a,), p + "fn.0.bias": (a,), p + "fn.1.beta": (1, a, 1, 1, 1),
                         p + "fn.2.conv.weight": (b, a, 3, 3, 3), p + "fn.2.conv.bias": (b,),
                         p + "fn.3.weight": (b,), p + "fn.3.bias": (b,), p + "fn.4.beta": (1, b, 1, 1, 1),
                         p + "fn.5.conv.weight": (b, b, 3, 3, 3), p + "fn.5.conv.bias": (b,)})
            if a != b:
                keys[p + "residual_fn.0.conv.weight"] = (b, a, 1, 1, 1)
                keys[p + "residual_fn.0.conv.bias"] = (b,)
    return keys


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = VideoTokenizer(TokenizerConfig.from_preset("tiny")).eval()
    with torch.no_grad():  # non-trivial norms and swish betas
        for name, p in tok.named_parameters():
            if p.dim() == 1 or name.endswith("beta"):
                p.add_(torch.randn_like(p) * 0.3)
    return tok


def test_full_size_state_dict_matches_published_constructor():
    with torch.device("meta"):
        tok = VideoTokenizer(TokenizerConfig.from_preset("magvit2"))
    ours = {k: tuple(v.shape) for k, v in tok.state_dict().items()}
    expected = {**_published_keys("encoder_layers", PUBLISHED_ENCODER),
                **_published_keys("decoder_layers", PUBLISHED_DECODER)}
    assert ours == expected
    assert len(ours) == 434
    assert ours["decoder_layers.9.conv.weight"] == (4096, 512, 3, 3, 3)  # after 8 units of 512
    assert ours["encoder_layers.26.weight"] == (6, 512, 1, 1, 1)
    # Strides of the encoder's downsampling convs and the decoder's depth-to-space factors.
    assert [tuple(tok.encoder_layers[i].conv.stride) for i in (5, 10, 15)] == [(1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert tok.encoder_layers[0].conv.stride == (1, 1, 1)
    assert [tok.decoder_layers[i].factors for i in (10, 16, 22)] == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert tok.codebook_size == 64000 and tok.config.factors == (4, 8, 8)


@pytest.mark.parametrize("T,H,W", [(1, 16, 24), (5, 16, 24), (9, 24, 8)])
def test_encode_decode_shapes(tiny, T, H, W):
    video = torch.rand(2, 3, T, H, W)
    codes = tiny.encode(video)
    assert codes.shape == (2, 1 + (T - 1) // 4, H // 8, W // 8) and codes.dtype == torch.int64
    assert codes.min() >= 0 and codes.max() < 64
    out = tiny.decode(codes)
    assert out.shape == video.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # Codes are what the quantizer gives for the encoder's latents.
    _, idx = tiny.quantize(tiny.encode_latents(video))
    assert torch.equal(idx, codes)
    assert torch.equal(tiny.codes_to_indices(tiny.indices_to_codes(codes)), codes)


def test_encoder_and_decoder_are_causal_in_time(tiny):
    video = torch.rand(1, 3, 9, 16, 16)
    later = video.clone()
    later[:, :, 5:] = torch.rand_like(later[:, :, 5:])
    z, z2 = tiny.encode_latents(video), tiny.encode_latents(later)
    assert torch.equal(z[:, :, :2], z2[:, :, :2])       # frames 0..4 -> latent frames 0, 1
    assert not torch.equal(z[:, :, 2], z2[:, :, 2])
    codes = tiny.encode(video)
    codes2 = codes.clone()
    codes2[:, 2] = (codes2[:, 2] + 1) % 64
    v, v2 = tiny.decode(codes), tiny.decode(codes2)
    assert torch.equal(v[:, :, :5], v2[:, :, :5])       # latent frames 0, 1 -> frames 0..4
    assert not torch.equal(v[:, :, 5:], v2[:, :, 5:])


def test_depth_to_space_channel_order():
    x = torch.randn(2, 2 * 2 * 2 * 3, 3, 2, 4)
    y = DepthToSpace3D((2, 2, 2))(x)
    assert y.shape == (2, 3, 3 * 2 - 1, 4, 8)
    full = torch.empty(2, 3, 6, 4, 8)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                for c in range(3):
                    full[:, c, i::2, j::2, k::2] = x[:, ((i * 2 + j) * 2 + k) * 3 + c]
    assert torch.equal(y, full[:, :, 1:])
    assert DepthToSpace3D((1, 2, 2))(x).shape == (2, 6, 3, 4, 8)


def test_group_norm_is_per_frame():
    gn = GroupNorm3D(4, 8)
    with torch.no_grad():
        gn.weight.normal_()
        gn.bias.normal_()
    x = torch.randn(2, 8, 3, 5, 6) * torch.arange(1, 4).view(1, 1, 3, 1, 1)
    ref = torch.stack([nn.GroupNorm.forward(gn, x[:, :, t]) for t in range(3)], dim=2)
    assert torch.allclose(gn(x), ref, atol=1e-6)


def test_causal_conv_pads_replicate_in_front_only(tiny):
    conv = tiny.encoder_layers[0]
    x = torch.randn(1, 3, 4, 6, 5)
    xp = torch.cat([x[:, :, :1]] * 2 + [x], dim=2)                 # time: two copies of frame 0 in front
    xp = torch.cat([xp[:, :, :, :1], xp, xp[:, :, :, -1:]], dim=3)  # height: replicate both sides
    xp = torch.cat([xp[..., :1], xp, xp[..., -1:]], dim=4)          # width: replicate both sides
    ref = F.conv3d(xp, conv.conv.weight, conv.conv.bias)
    assert torch.allclose(conv(x), ref, atol=1e-6)


def test_forward_is_differentiable_through_quantizer(tiny):
    video = torch.rand(1, 3, 5, 8, 8)
    recon, idx = tiny(video)
    assert recon.shape == video.shape and idx.shape == (1, 2, 1, 1)
    recon.square().mean().backward()
    grad = tiny.encoder_layers[0].conv.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


def test_time_factor_follows_config():
    cfg = TokenizerConfig(encoder_channels=(8, 8, 8), encoder_units=(1, 1, 1), decoder_channels=(8, 8, 8),
                          decoder_units=(1, 1, 1), strides=((2, 2, 2), (1, 2, 1)), norm_groups=2,
                          fsq_levels=(3, 3))
    assert cfg.factors == (2, 4, 2) and cfg.codebook_size == 9
    tok = VideoTokenizer(cfg)
    video = torch.rand(1, 3, 7, 8, 6)
    codes = tok.encode(video)
    assert codes.shape == (1, 4, 2, 3)
    assert tok.decode(codes).shape == video.shape
    with pytest.raises(ValueError, match=r"T = 1 \+ 2k"):
        tok.encode(torch.rand(1, 3, 4, 8, 6))


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 2, 16, 16), r"T = 1 \+ 4k frames .* got T = 2"),
    ((1, 3, 6, 16, 16), r"got T = 6"),
    ((1, 3, 0, 16, 16), r"got T = 0"),
    ((1, 3, 5, 12, 16), r"H divisible by 8 .* got H = 12"),
    ((1, 3, 5, 16, 20), r"W = 20"),
    ((1, 1, 5, 16, 16), r"expected a float tensor \[batch, 3, T, H, W\]"),
    ((3, 5, 16, 16), r"expected a float tensor \[batch, 3, T, H, W\]"),
])
def test_bad_video(tiny, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny.encode(torch.rand(shape))


def test_bad_codes(tiny):
    with pytest.raises(ValueError, match=r"video: expected a float tensor with values in \[0, 1\]"):
        tiny.encode(torch.zeros(1, 3, 5, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"codes: expected indices in \[0, 64\), got min 0, max 64"):
        tiny.decode(torch.tensor([[[[0, 64]]]]))
    with pytest.raises(ValueError, match=r"codes: expected indices in \[0, 64\), got min -1"):
        tiny.decode(torch.tensor([[[[-1, 3]]]]))
    with pytest.raises(ValueError, match="codes: expected an integer tensor"):
        tiny.decode(torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"codes: expected an int64 tensor \[batch, t, h, w\]"):
        tiny.decode(torch.zeros(1, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"codes: expected \[batch, 3, t, h, w\]"):
        tiny.decode_latents(torch.zeros(1, 6, 1, 2, 2))


def test_config_validation_and_dict_round_trip():
    with pytest.raises(ConfigError, match="norm_groups"):
        TokenizerConfig(norm_groups=5)
    with pytest.raises(ConfigError, match="stages"):
        TokenizerConfig(encoder_units=(1, 1, 1))
    with pytest.raises(ConfigError, match="strides"):
        TokenizerConfig(strides=((1, 3, 2), (2, 2, 2), (2, 2, 2)))
    with pytest.raises(ConfigError, match="kernel_size"):
        TokenizerConfig(kernel_size=4)
    with pytest.raises(ConfigError, match="unknown tokenizer preset"):
        TokenizerConfig.from_preset("nope")
    with pytest.raises(ConfigError, match="unknown TokenizerConfig fields"):
        TokenizerConfig.from_dict({"width": 3})
    for cfg in TOKENIZER_PRESETS.values():
        assert TokenizerConfig.from_dict(cfg.to_dict()) == cfg


def test_save_and_from_pretrained(tiny, tmp_path, assert_same_tokenizer):
    tiny.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    back = VideoTokenizer.from_pretrained(tmp_path / "tok")
    assert back.config == tiny.config and not back.training
    assert_same_tokenizer(tiny, back)


def test_low_precision_weights(tiny):
    half = copy.deepcopy(tiny).to(torch.bfloat16)
    video = torch.rand(1, 3, 5, 16, 8)
    codes = half.encode(video)                     # float32 input is cast to the weights' dtype
    assert codes.shape == (1, 2, 2, 1) and codes.dtype == torch.int64
    out = half.decode(codes)
    assert out.dtype == torch.float32 and out.shape == video.shape
    assert out.min() >= 0 and out.max() <= 1
    ref = tiny.decode(codes)
    assert (out - ref).abs().max() < 0.1           # same network, bf16 rounding only


def _conv_flops_by_hand(cfg, T, H, W):
    """Conv FLOPs from the config alone: 3x3x3 causal convs keep (or stride) the grid, 1x1x1 projections."""
    k3 = cfg.kernel_size ** 3

    def units(prev, width, n, vox):
        total = 0
        for _ in range(n):
            total += 2 * k3 * vox * (prev * width + width * width) + (2 * prev * width * vox if prev != width else 0)
            prev = width
        return total

    t, h, w = T, H, W
    prev = cfg.encoder_channels[0]
    enc = 2 * cfg.in_channels * prev * k3 * t * h * w
    for i, (width, n) in enumerate(zip(cfg.encoder_channels, cfg.encoder_units)):
        enc, prev = enc + units(prev, width, n, t * h * w), width
        if i < len(cfg.strides):
            st, sh, sw = cfg.strides[i]
            t, h, w = (t - 1) // st + 1, (h - 1) // sh + 1, (w - 1) // sw + 1
            enc += 2 * width * width * k3 * t * h * w
    enc += 2 * prev * cfg.latent_dim * t * h * w
    prev = cfg.decoder_channels[0]
    dec = 2 * cfg.latent_dim * prev * k3 * t * h * w
    for i, (width, n) in enumerate(zip(cfg.decoder_channels, cfg.decoder_units)):
        dec, prev = dec + units(prev, width, n, t * h * w), width
        if i < len(cfg.strides):
            ft, fh, fw = cfg.strides[::-1][i]
            dec += 2 * width * width * ft * fh * fw * k3 * t * h * w
            t, h, w = t * ft - (ft - 1), h * fh, w * fw
    return {"encode": enc, "decode": dec + 2 * prev * cfg.in_channels * k3 * t * h * w}


@pytest.mark.parametrize("T,H,W", [(17, 32, 32), (5, 16, 24), (1, 8, 8)])
def test_flops_count_every_conv(tiny, T, H, W):
    assert tiny.flops(T, H, W) == _conv_flops_by_hand(tiny.config, T, H, W)
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        tiny.flops(T + 1, H, W)


def test_flops_of_the_published_clip():
    with torch.device("meta"):
        tok = VideoTokenizer(TokenizerConfig.from_preset("magvit2"))
    counts = tok.flops(17, 128, 128)
    assert counts == _conv_flops_by_hand(tok.config, 17, 128, 128)
    assert counts["encode"] == 4_470_771_023_872      # 4.47 TFLOP, the figure of issue 15
    assert counts["decode"] == 6_190_875_017_216


def test_channels_last_3d_equals_default(tiny):
    assert tiny.cpu_memory_format == torch.channels_last_3d      # the CPU default
    cl, tiny = copy.deepcopy(tiny), copy.deepcopy(tiny)
    tiny.cpu_memory_format = torch.contiguous_format
    video = torch.rand(2, 3, 9, 16, 24)
    with torch.no_grad():
        z, z_cl = tiny.encode_latents(video), cl.encode_latents(video)
    assert z_cl.is_contiguous() and torch.allclose(z_cl, z, atol=1e-5)
    codes = tiny.encode(video)
    out = cl.decode(codes)
    assert out.is_contiguous() and torch.allclose(out, tiny.decode(codes), atol=1e-5)
    # channels_last weights give the same numbers too
    cl.to(memory_format=torch.channels_last_3d)
    assert torch.allclose(cl.decode(codes), out, atol=1e-5)


def test_bf16_reconstruction_within_half_a_db_of_fp32():
    from nbp.demo import heldout_clips, load_demo
    from nbp.metrics import psnr

    video, _ = heldout_clips(8)
    tok = load_demo().tokenizer
    fp32 = psnr(tok.decode(tok.encode(video)), video)
    bf16 = psnr(tok.to(torch.bfloat16).decode(tok.encode(video)), video)
    assert fp32 > 25 and abs(bf16 - fp32) < 0.5
