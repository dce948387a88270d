"""nbp.layout: ids, offsets, block order, prompts and scoring sequences; the generator's
frame prediction with conditional begin-of-video models; input checks."""
from __future__ import annotations

import pytest
import torch

from nbp import layout
from nbp.blocks import to_block_order
from nbp.config import TransformerConfig
from nbp.generate import FastGenerator
from nbp.model import NBPTransformer
from nbp.reference import generate_tokens as reference_generate
from nbp.tokenizer import TokenizerConfig, VideoTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

K600 = dict()                                                           # no condition, no bov
BOV_CLASS = dict(bov=True, cond_len=1, cond_vocab_size=5, vocab_size=1 + 5 + 64)   # the demo's
HYBRID = dict(hybrid=True, bov=True, cond_len=3, cond_vocab_size=7, vocab_size=4 + 7 + 64)


def tiny(**over) -> TransformerConfig:
    return TransformerConfig.from_preset("tiny", **over)


def sharp_model(seed: int = 0, **over) -> NBPTransformer:
    """A tiny random model with large weights, so greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = NBPTransformer(tiny(**over)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(20)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerConfig.from_preset("tiny")).eval()   # 9x32x32 -> (3, 4, 4)


def clip(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 9, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- ids ---------------------------------------------------------------------------

def test_condition_ids_are_shifted_and_validated():
    cfg = tiny(**HYBRID)
    assert torch.equal(layout.condition_ids(cfg, cond_ids=[[0, 1, 6]]), torch.tensor([[4, 5, 10]]))
    ccfg = tiny(**BOV_CLASS)
    assert torch.equal(layout.condition_ids(ccfg, [0, 4]), torch.tensor([[1], [5]]))
    assert layout.condition_ids(tiny(), batch_size=3).shape == (3, 0)
    for bad, match in (([1.5], "class_ids.*integer"), (torch.tensor([1.0]), "class_ids.*integer"),
                       ([True], "class_ids.*integer"), ([5], r"class_ids.*\[0, 5\)"),
                       ([-1], "class_ids"), ([], "class_ids.*at least one"),
                       ([[1, 2]], "class_ids.*one class per sample")):
        with pytest.raises(ValueError, match=match):
            layout.condition_ids(ccfg, bad)
    with pytest.raises(ValueError, match="class_ids, cond_ids: this model is conditional"):
        layout.condition_ids(ccfg)
    with pytest.raises(ValueError, match="at most one"):
        layout.condition_ids(ccfg, [1], [[1]])
    with pytest.raises(ValueError, match="class_ids.*one per sample"):
        layout.condition_ids(ccfg, [1, 2], batch_size=3)
    with pytest.raises(ValueError, match=r"cond_ids.*\[batch, 3\]"):
        layout.condition_ids(cfg, cond_ids=[[1, 2]])
    with pytest.raises(ValueError, match="class_ids.*3 tokens"):
        layout.condition_ids(cfg, [1])
    for bad in (0, -2, 1.0, True):
        with pytest.raises(ValueError, match="batch_size"):
            layout.condition_ids(tiny(), batch_size=bad)


@pytest.mark.parametrize("over, n", [(K600, 0), (BOV_CLASS, 4), (HYBRID, 1)])
def test_bov_ids(over, n):
    ids = layout.bov_ids(tiny(**over), 2)
    assert ids.shape == (2, n) and ids.dtype == torch.int64 and (ids == 0).all()


@pytest.mark.parametrize("block_shape", [(1, 1, 4), (1, 2, 2), (3, 1, 1)])
def test_codes_round_trip_and_prefix(block_shape):
    cfg = tiny(**BOV_CLASS, block_shape=block_shape)
    codes = torch.randint(0, 64, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    ids = layout.codes_to_ids(cfg, codes)
    assert int(ids.min()) >= cfg.video_offset
    assert torch.equal(ids, to_block_order(codes, block_shape) + cfg.video_offset)
    assert torch.equal(layout.ids_to_codes(cfg, ids), codes)
    if block_shape[0] == 1:   # the given frames' ids start the whole grid's ids
        assert torch.equal(layout.codes_to_ids(cfg, codes[:, :2]), ids[:, :32])
    else:
        with pytest.raises(ValueError, match="codes.*multiple of 3"):
            layout.codes_to_ids(cfg, codes[:, :2])


def test_ids_outside_the_video_range_are_clamped():
    cfg = tiny(**BOV_CLASS)
    ids = torch.full((1, cfg.video_len), cfg.video_offset + 5)
    ids[0, 0], ids[0, 1] = 0, cfg.vocab_size + 9
    codes = layout.ids_to_codes(cfg, ids).flatten()
    assert codes[0] == 0 and codes[1] == cfg.codebook_size - 1 and (codes[2:] == 5).all()
    with pytest.raises(ValueError, match="codes.*codebook_size"):
        layout.codes_to_ids(cfg, torch.full((1, 3, 4, 4), 64))


# --- sequences ---------------------------------------------------------------------

@pytest.mark.parametrize("over", [BOV_CLASS, HYBRID])
def test_class_scoring_rows_are_the_teacher_forced_sequence_of_each_class(over):
    cfg = tiny(**{**over, "cond_len": 1})
    given = layout.codes_to_ids(cfg, torch.randint(0, 64, (2, 2, 4, 4)))
    with pytest.raises(ValueError, match="cond_len 1"):
        layout.class_scoring_sequences(tiny(), given)
    inputs, targets = layout.class_scoring_sequences(cfg, given)
    K = cfg.cond_vocab_size
    assert inputs.shape[0] == 2 * K
    for b in range(2):
        for k in range(K):
            cond = layout.condition_ids(cfg, [k])
            want_in, want_tgt = layout.teacher_forced(cfg, cond, given[b:b + 1])
            assert torch.equal(inputs[b * K + k], want_in[0])
            assert torch.equal(targets[b * K + k], want_tgt[0])
    scored = targets[:, 1:]
    assert (scored != layout.IGNORE).all() and (targets[:, 0] == layout.IGNORE).all()


def test_training_sequences_refuse_float_conditions():
    cfg = tiny(**BOV_CLASS)
    with pytest.raises(ValueError, match="cond.*integer"):
        layout.training_sequences(cfg, torch.zeros(1, 3, 4, 4, dtype=torch.long),
                                  torch.tensor([[1.5]]))


# --- prompts -----------------------------------------------------------------------

def test_prompts_of_each_layout():
    cfg = tiny(**BOV_CLASS)
    given = layout.codes_to_ids(cfg, torch.randint(0, 64, (2, 2, 4, 4)))
    cond = layout.condition_ids(cfg, [3, 0])
    p = layout.frame_prediction_prompt(cfg, cond, given)
    assert p.ids.tolist() == [[4, 0, 0, 0, 0] + given[0].tolist(), [1, 0, 0, 0, 0] + given[1].tolist()]
    assert p.cond_len == 1 and p.num_new_tokens == 16
    new = torch.full((2, 16), 7)
    assert torch.equal(p.video_ids(new), torch.cat([given, new], 1))
    v = layout.video_prompt(cfg, cond)
    assert v.ids.tolist() == [[4, 0, 0, 0, 0], [1, 0, 0, 0, 0]] and v.num_new_tokens == cfg.video_len
    k600 = tiny()
    p = layout.frame_prediction_prompt(k600, layout.condition_ids(k600, batch_size=2), given)
    assert torch.equal(p.ids, given) and p.cond_len == 0
    hy = tiny(**HYBRID)
    assert layout.video_prompt(hy, layout.condition_ids(hy, cond_ids=[[1, 2, 3]])).ids.tolist() \
        == [[5, 6, 7, 0]]
    with pytest.raises(ValueError, match="hybrid.*generate_video"):
        layout.frame_prediction_prompt(hy, torch.zeros(2, 3, dtype=torch.long), given)
    with pytest.raises(ValueError, match="begin-of-video.*predict_frames"):
        layout.video_prompt(k600, torch.empty(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="class_ids, cond_ids: expected one per video"):
        layout.frame_prediction_prompt(cfg, cond[:1], given)


# --- video checks ------------------------------------------------------------------

@pytest.mark.parametrize("video, match", [
    ((clip() * 255).to(torch.uint8), "video: expected float.*uint8"),
    (clip() * 255, r"video: expected values in \[0, 1\], found .*255"),
    (clip() * 2 - 1, r"video: expected values in \[0, 1\], found \[-.*\(x \+ 1\) / 2"),
    (clip().index_fill(2, torch.tensor([1]), float("nan")), "video: .*NaN"),
    (clip()[:, :, 0], r"video: expected a float tensor \[batch, 3, T, H, W\]"),
    ([[0.5]], "video: expected a float tensor"),
])
def test_given_frames_refuse_bad_video(video, match):
    with pytest.raises(ValueError, match=match):
        layout.given_frames(video, 5, 2)


def test_given_frames_checks_num_cond_frames():
    assert layout.given_frames(clip(), 5, 2).shape == (2, 3, 5, 32, 32)
    for bad in (4, 0, 11, 5.0, True):
        with pytest.raises(ValueError, match="num_cond_frames"):
            layout.given_frames(clip(), bad, 2)


# --- the generator -----------------------------------------------------------------

def test_predict_frames_with_a_conditional_bov_model(tokenizer):
    """A demo-layout model continues given frames from [class, bov x L, codes]."""
    model = sharp_model(**BOV_CLASS)
    gen = FastGenerator(model, tokenizer)
    video = clip()
    out = gen.predict_frames(video, 5, class_ids=[2, 4], do_sample=False)
    cfg = model.config
    given = layout.codes_to_ids(cfg, tokenizer.encode(video[:, :, :5]))
    prompt = torch.cat([torch.tensor([[3], [5]]), torch.zeros(2, 4, dtype=torch.long), given], 1)
    new = reference_generate(model, prompt, 16, cond_len=1, do_sample=False)
    torch.testing.assert_close(out, tokenizer.decode(layout.ids_to_codes(cfg, torch.cat([given, new], 1))))
    with pytest.raises(ValueError, match="class_ids"):
        gen.predict_frames(video, 5)
    with pytest.raises(ValueError, match="class_ids.*integer"):
        gen.predict_frames(video, 5, class_ids=[1.5, 2])
    with pytest.raises(ValueError, match="video.*NaN"):
        gen.predict_frames(torch.full_like(video, float("nan")), 5, class_ids=[1, 2])
    with pytest.raises(ValueError, match="hybrid"):
        FastGenerator(sharp_model(**HYBRID), tokenizer).predict_frames(video, 5, cond_ids=[[1, 2, 3]] * 2)


def test_generate_video_refuses_batch_size_zero(tokenizer):
    gen = FastGenerator(sharp_model(bov=True, vocab_size=65), tokenizer)
    assert gen.generate_video(batch_size=2, do_sample=False).shape == (2, 3, 9, 32, 32)
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate_video(batch_size=0)


def test_most_likely_class_is_the_argmax_of_per_class_likelihoods(tokenizer):
    model = sharp_model(**BOV_CLASS)
    gen = FastGenerator(model, tokenizer)
    video = clip(3, seed=4)
    got = gen.most_likely_class(video, 5)
    assert got.dtype == torch.int64 and got.shape == (3,)
    assert torch.equal(gen.most_likely_class(video, 5, max_rows=2), got)
    given = layout.codes_to_ids(model.config, tokenizer.encode(video[:, :, :5]))
    with torch.no_grad():
        losses = torch.stack([
            torch.stack([model.loss(*layout.teacher_forced(model.config, torch.tensor([[k + 1]]),
                                                           given[b:b + 1]), cond_len=1)
                         for k in range(5)]) for b in range(3)])
    assert torch.equal(got, losses.argmin(dim=1))
    top2 = losses.topk(2, dim=1, largest=False).values
    assert (top2[:, 1] - top2[:, 0] > 1e-3).all()      # no near-tie decides the comparison
    with pytest.raises(ValueError, match="cond_len 1"):
        FastGenerator(sharp_model(), tokenizer).most_likely_class(video, 5)
    with pytest.raises(ValueError, match="max_rows"):
        gen.most_likely_class(video, 5, max_rows=0)


def test_most_likely_class_of_demo_clips_beats_chance():
    """The demo NBP model's class scores recover the labels of held-out clips far above
    chance (1 in 12): 4 of these 12 (measured; the NTP model: 6)."""
    from nbp.demo import heldout_clips, load_demo

    demo = load_demo()
    video, labels = heldout_clips(12)
    got = FastGenerator(demo.nbp, demo.tokenizer, device="cpu").most_likely_class(video, 5)
    assert int((got == labels).sum()) >= 3
