"""StreamingDecoder: chunked decoding equals whole-video decoding."""
import pytest
import torch

from nbp.streaming import StreamingDecoder
from nbp.tokenizer import TokenizerConfig, VideoTokenizer

CFG = dict(encoder_channels=(8, 16), encoder_units=(1, 1), decoder_channels=(16, 8),
           decoder_units=(1, 1), norm_groups=4, fsq_levels=(4, 4, 4))


def _tokenizer(strides):
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerConfig(strides=strides, **CFG)).eval()


@pytest.mark.parametrize("strides", [((2, 2, 2),), ((1, 2, 2),)])
@pytest.mark.parametrize("chunks", [(1, 1, 1, 1, 1), (1, 2, 2), (3, 2), (5,)])
def test_streamed_frames_equal_whole_decode(strides, chunks):
    tok = _tokenizer(strides)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, tok.codebook_size, (2, sum(chunks), 4, 4), generator=g)
    whole = tok.decode(codes)
    stream, parts, t = StreamingDecoder(tok), [], 0
    ft = tok.config.factors[0]
    for i, n in enumerate(chunks):
        out = stream.push(codes[:, t:t + n])
        assert out.shape[2] == (1 + ft * (n - 1) if i == 0 else ft * n)
        parts.append(out)
        t += n
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=2e-6)


def test_reset_starts_a_new_video():
    tok = _tokenizer(((2, 2, 2),))
    codes = torch.randint(0, tok.codebook_size, (1, 3, 4, 4))
    stream = StreamingDecoder(tok)
    first = stream.push(codes)
    stream.reset()
    torch.testing.assert_close(stream.push(codes), first, rtol=0, atol=0)


def test_errors():
    tok = _tokenizer(((2, 2, 2),))
    with pytest.raises(ValueError, match="tokenizer"):
        StreamingDecoder(object())
    stream = StreamingDecoder(tok)
    stream.push(torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        stream.push(torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="codes"):
        stream.push(torch.full((2, 1, 4, 4), tok.codebook_size))
