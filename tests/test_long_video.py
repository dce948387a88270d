"""nbp.long_video: videos past the trained length with a rolling latent window.

Each later window must be exactly the reference generator's continuation of
its context (greedy), the output must decode frame by frame as the whole video
decodes, and the cache must hold one window whatever the video's length.
"""
from __future__ import annotations

import pytest
import torch

from nbp import layout
from nbp import long_video as lv
from nbp.blocks import to_block_order
from nbp.config import TransformerConfig
from nbp.generate import FastGenerator
from nbp.model import NBPTransformer
from nbp.reference import generate_tokens as reference_generate
from test_layout import sharp_model, tokenizer  # noqa: F401  (the tiny models and tokenizer fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# The tiny preset: 3 latent frames of 4x4 codes, blocks of (1, 1, 4); the tiny tokenizer
# turns 9x32x32 frames into 3x4x4 codes (time factor 4).
BOV_CLASS = dict(bov=True, cond_len=1, cond_vocab_size=5, vocab_size=1 + 5 + 64)   # the demo's
K600 = dict()




def clip(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 9, 32, 32, generator=torch.Generator().manual_seed(seed))


def as_codes(cfg, ids: torch.Tensor) -> torch.Tensor:
    """Reference ids as the long generator keeps them: clamped to the video range (a random
    model may emit condition or bov ids, see ``layout.ids_to_codes``)."""
    return ids.clamp(cfg.video_offset, cfg.video_offset + cfg.codebook_size - 1)


def long_codes(gen, video, num_frames, window, **kw) -> tuple[torch.Tensor, layout.Prompt]:
    """(all latent frames int64 [B, n, h, w] of a long prediction, its first window's prompt)."""
    first = gen.frame_prompt(video, 5, class_ids=kw.pop("class_ids", None))
    plan = lv.plan_long_video(gen.config, 4, num_frames, window, first.given.shape[1] // 16)
    return torch.cat(list(lv.stream_latents(gen, first, plan, **kw)), dim=1), first


@pytest.mark.parametrize("window, cfg_scale, reencode",
                         [(1, None, False), (2, None, False), (2, 3.0, False), (1, 3.0, False),
                          (2, None, True)])
def test_every_window_is_the_reference_continuation_of_its_context(tokenizer, window, cfg_scale,
                                                                   reencode):
    model = sharp_model(**BOV_CLASS)
    cfg = model.config
    gen = FastGenerator(model, tokenizer)
    codes, first = long_codes(gen, clip(), 29, window, class_ids=[1, 3], do_sample=False,
                              cfg_scale=cfg_scale, reencode=reencode)
    assert codes.shape == (2, 8, 4, 4)
    t, new = cfg.latent_shape[0], cfg.latent_shape[0] - window
    ref = reference_generate(model, first.ids, first.num_new_tokens, cond_len=1, do_sample=False,
                             cfg_scale=cfg_scale)
    torch.testing.assert_close(to_block_order(codes[:, 2:t], cfg.block_shape) + cfg.video_offset,
                               as_codes(cfg, ref))
    cond = first.ids[:, :1]
    for start in range(t, codes.shape[1], new):
        context = codes[:, start - window:start]
        if reencode:
            context = tokenizer.encode(tokenizer.decode(context))
        prompt = lv.window_prompt(cfg, cond, context)
        assert prompt.ids.shape == (2, 1 + 4 + window * 16)
        got = codes[:, start:start + new]
        ref = reference_generate(model, prompt.ids, got.shape[1] * 16, cond_len=1,
                                 do_sample=False, cfg_scale=cfg_scale)
        torch.testing.assert_close(to_block_order(got, cfg.block_shape) + cfg.video_offset,
                                   as_codes(cfg, ref))


def test_streamed_frames_are_the_whole_video_decoded(tokenizer):
    model = sharp_model(**K600)
    gen = FastGenerator(model, tokenizer)
    video = clip()
    chunks = list(lv.stream_frames(gen, video, 5, num_frames=25, do_sample=False))
    assert [c.shape[2] for c in chunks] == [1] + [4] * 6
    assert all(c.dtype == torch.float32 and c.shape[:2] == (2, 3) for c in chunks)
    codes, _ = long_codes(gen, video, 25, None, do_sample=False)
    torch.testing.assert_close(torch.cat(chunks, 2), tokenizer.decode(codes), rtol=0, atol=1e-5)
    whole = lv.predict_frames(gen, video, 5, num_frames=25, do_sample=False)
    assert whole.shape == (2, 3, 25, 32, 32)
    torch.testing.assert_close(whole, torch.cat(chunks, 2), rtol=0, atol=0)


def test_frames_come_out_as_soon_as_their_latent_frame_is_drawn(tokenizer, monkeypatch):
    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    inner, drawn = gen.stream_tokens, [0]

    def counting(*args, **kw):
        steps = inner(*args, **kw)
        source = steps._steps

        def counted():
            for item in source:
                drawn[0] += 1
                yield item
        steps._steps = counted()
        return steps
    monkeypatch.setattr(gen, "stream_tokens", counting)
    seen = [(chunk.shape[2], drawn[0]) for chunk in
            lv.stream_frames(gen, num_frames=17, class_ids=[1, 2], do_sample=False)]
    # 16 codes per latent frame, 4 per step: the first window's 3 latent frames come out
    # after steps 4, 8 and 12 of its 12, not when the window ends; then one per window.
    assert seen == [(1, 4), (4, 8), (4, 12), (4, 16), (4, 20)]


def test_within_the_trained_length_it_is_ordinary_frame_prediction(tokenizer):
    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    video = clip()
    short = gen.predict_frames(video, 5, class_ids=[0, 4], do_sample=False)
    same = lv.predict_frames(gen, video, 5, num_frames=9, class_ids=[0, 4], do_sample=False)
    torch.testing.assert_close(same, short, rtol=0, atol=1e-5)


def test_greedy_and_seeded_long_generation_are_deterministic(tokenizer):
    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    video = clip()
    runs = [lv.predict_frames(gen, video, 5, num_frames=33, class_ids=[2, 2], do_sample=False)
            for _ in range(2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    drawn = [lv.generate_video(gen, [1, 2], num_frames=33, top_k=8,
                               generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert drawn[0].shape == (2, 3, 33, 32, 32)
    torch.testing.assert_close(drawn[0], drawn[1], rtol=0, atol=0)


def test_the_cache_holds_one_window_whatever_the_length(tokenizer, monkeypatch):
    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    cfg, read = gen.config, []
    inner = gen.stream_tokens

    def spy(ids, n, **kw):
        read.append(ids.shape[1] + n)
        return inner(ids, n, **kw)
    monkeypatch.setattr(gen, "stream_tokens", spy)
    lengths = {}
    for frames in (13, 65):
        read.clear()
        lv.predict_frames(gen, clip(), 5, num_frames=frames, class_ids=[0, 1], do_sample=False)
        lengths[frames] = gen.cache.max_len
        assert max(read) <= 1 + 4 + cfg.video_len   # never more than one trained sequence
    assert len(read) == 1 + (1 + 64 // 4 - cfg.latent_shape[0])   # one window per new latent frame
    assert lengths[13] == lengths[65]


def test_bad_requests_are_refused_before_any_work(tokenizer):
    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    video = clip()
    for frames in (10, 0, 8.0, True):
        with pytest.raises(ValueError, match=r"num_frames: expected 1 \+ 4k"):
            lv.stream_frames(gen, video, 5, num_frames=frames, class_ids=[0, 1])
    with pytest.raises(ValueError, match="num_frames: expected more frames than the given"):
        lv.stream_frames(gen, video, 5, num_frames=5, class_ids=[0, 1])
    with pytest.raises(ValueError, match="window: expected at least one block"):
        lv.stream_frames(gen, video, 5, num_frames=17, window=0, class_ids=[0, 1])
    with pytest.raises(ValueError, match="window: expected fewer latent frames than the trained"):
        lv.stream_frames(gen, video, 5, num_frames=17, window=3, class_ids=[0, 1])
    with pytest.raises(ValueError, match="reencode: expected True or False"):
        lv.stream_frames(gen, video, 5, num_frames=17, class_ids=[0, 1], reencode="yes")
    with pytest.raises(ValueError, match="window: expected None or an int"):
        lv.check_window(gen.config, 1.5)
    # The position table of exactly one trained sequence: 5 prefix ids + 3 latent frames - L.
    table = TransformerConfig.from_preset("tiny", max_seq_len=1 + 4 + 48 - 4, **BOV_CLASS)
    assert lv.check_window(table, None) == 2
    with pytest.raises(ValueError, match=r"window: .* more than the model's position table .* "
                                         r"expected at most 2"):
        lv.check_window(table, 3)
    with pytest.raises(ValueError, match=r"position table .* expected at most 2"):
        lv.stream_frames(FastGenerator(NBPTransformer(table), tokenizer), video, 5, num_frames=17,
                         window=4, class_ids=[0, 1])
    rows = TransformerConfig.from_preset("tiny", latent_shape=(4, 4, 4), block_shape=(2, 1, 2))
    assert lv.check_window(rows, None) == 2
    for window in (1, 3):
        with pytest.raises(ValueError, match=r"at least one block .* bt=2"):
            lv.check_window(rows, window)
    hybrid = FastGenerator(sharp_model(hybrid=True, bov=True, cond_len=3, cond_vocab_size=7,
                                       vocab_size=4 + 7 + 64), tokenizer)
    with pytest.raises(ValueError, match="num_frames: hybrid models"):
        lv.generate_video(hybrid, cond_ids=[[1, 2, 3]], num_frames=13)
    with pytest.raises(ValueError, match="tokenizer"):
        lv.stream_frames(FastGenerator(sharp_model()), video, num_frames=13)


def test_fast_generator_methods_delegate_to_the_rolling_window(tokenizer):
    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    video = clip()
    got = gen.predict_frames(video, 5, class_ids=[0, 3], num_frames=21, window=1, do_sample=False)
    want = lv.predict_frames(gen, video, 5, num_frames=21, window=1, class_ids=[0, 3],
                             do_sample=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    streamed = torch.cat(list(gen.stream_frames(video, 5, num_frames=21, window=1,
                                                class_ids=[0, 3], do_sample=False)), dim=2)
    torch.testing.assert_close(streamed, want, rtol=0, atol=0)
    whole = gen.generate_video([1, 4], num_frames=21, do_sample=False)
    torch.testing.assert_close(whole, lv.generate_video(gen, [1, 4], num_frames=21,
                                                        do_sample=False), rtol=0, atol=0)
    assert whole.shape == (2, 3, 21, 32, 32)
    with pytest.raises(ValueError, match="num_frames"):
        gen.generate_video([1, 4], num_frames=20)


def test_an_mp4_stream_grows_as_frames_come(tokenizer, tmp_path):
    import io

    import imageio.v3 as iio

    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    path, sizes = tmp_path / "long.mp4", []

    def watched():
        for chunk in gen.stream_frames(clip(1), 5, num_frames=21, class_ids=[2], do_sample=False):
            sizes.append(path.stat().st_size if path.exists() else 0)
            yield chunk
    log = io.StringIO()
    assert lv.write_mp4_stream(watched(), path, fps=8, total=21, counter=log) == 21
    assert sizes[0] == 0 and sizes[-1] > sizes[1] > 0     # written while the video is generated
    assert log.getvalue().rstrip().endswith("frame 21/21")
    frames = iio.imread(path, index=None, plugin="pyav")
    assert frames.shape == (21, 32, 32, 3)
    with pytest.raises(ValueError, match="path: a stream is written as MP4"):
        lv.write_mp4_stream([], tmp_path / "x.gif")


def test_cli_long_generation_writes_a_growing_mp4_or_returns_the_video(tokenizer, tmp_path):
    import argparse

    from nbp.commands import long_generate

    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--side-by-side", action="store_true")
    p.add_argument("--mark-given", action="store_true")
    long_generate.add_arguments(p)
    gen = FastGenerator(sharp_model(**BOV_CLASS), tokenizer)
    out = tmp_path / "v.mp4"
    args = p.parse_args(["--out", str(out), "--frames", "13", "--window", "1", "--stream"])
    args.scale = 2
    long_generate.check_args(args)
    request = dict(class_ids=[1], sampling=dict(do_sample=False, callback=print))
    frames = long_generate.run(args, gen, video=clip(1), **request)
    assert not out.exists()            # nothing generated before the file is written
    assert long_generate.write_stream(args, frames, 8.0) == 13
    import imageio.v3 as iio
    assert iio.imread(out, index=None, plugin="pyav").shape == (13, 64, 64, 3)
    args.stream = False
    video = long_generate.run(args, gen, video=clip(1), **request)
    want = lv.predict_frames(gen, clip(1), 5, num_frames=13, window=1, class_ids=[1],
                             do_sample=False)
    torch.testing.assert_close(video, want, rtol=0, atol=0)
    for argv, match in ((["--out", "v.mp4", "--stream"], "--stream: needs --frames"),
                        (["--out", "v.mp4", "--window", "2"], "--window: needs --frames"),
                        (["--out", "v.gif", "--frames", "9", "--stream"], "expected an .mp4"),
                        (["--out", "v.mp4", "--frames", "9", "--stream", "--side-by-side"],
                         "--side-by-side: composes the finished video")):
        with pytest.raises(ValueError, match=match):
            long_generate.check_args(p.parse_args(argv))


def test_nbp_generate_streams_a_long_demo_prediction(tmp_path, capfd):
    import imageio.v3 as iio

    from nbp.cli import main

    out = tmp_path / "long.mp4"
    assert main(["generate", "--predict", "--greedy", "--frames", "21", "--stream", "--out",
                 str(out), "--scale", "2"]) == 0
    assert iio.imread(out, index=None, plugin="pyav").shape == (21, 32, 32, 3)
    said = capfd.readouterr()
    assert "frame 21/21" in said.err and "NBP_LONG demo model" in said.out
    gif = tmp_path / "long.gif"
    assert main(["generate", "--class-id", "3", "--frames", "21", "--window", "4", "--out",
                 str(gif)]) == 0
    assert iio.imread(gif, index=None).shape[0] == 21


def test_nbp_eval_frames_reports_long_prediction_against_copy_last(capsys):
    import json

    from nbp.cli import main

    assert main(["eval", "--frames", "21", "--num-clips", "2", "--window", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["long_frames"], res["long_predicted_frames"], res["window"]) == (21, 16, 6)
    for name in ("nbp", "nbp_reencode"):
        assert res[f"long_margin_{name}"] == pytest.approx(
            res[f"long_psnr_{name}"] - res["long_psnr_copy_last"], abs=2e-4)
        assert res[f"long_no_collapse_{name}"] == (res[f"long_last16_std_{name}"]
                                                   >= 0.5 * res["long_last16_std_truth"])
        assert res[f"long_last16_std_{name}"] > 0.02        # the demo does not collapse
    assert res["long_model"] == "nbp_long"        # the shipped fine-tune for long videos
    assert main(["eval", "--frames", "20", "--num-clips", "1"]) == 2


def test_nbp_eval_frames_says_which_generator_it_ran(tmp_path, capsys):
    import json

    from nbp.cli import main
    from nbp.demo import DEMO_DIR

    base = tmp_path / "no_long"
    base.mkdir()
    for name in ("tokenizer", "nbp", "ntp"):
        (base / name).symlink_to(DEMO_DIR / name, target_is_directory=True)
    runs = {}
    for argv in (["--model", str(base)], ["--long-model", "nbp"], ["--long-model", "nbp_long"]):
        assert main(["eval", "--frames", "21", "--num-clips", "1", "--json", *argv]) == 0
        runs[argv[-1]] = json.loads(capsys.readouterr().out)
    assert runs[str(base)]["long_model"] == runs["nbp"]["long_model"] == "nbp"  # no nbp_long/: nbp
    assert runs[str(base)]["long_psnr_nbp"] == runs["nbp"]["long_psnr_nbp"]
    assert runs["nbp_long"]["long_model"] == "nbp_long"
    assert main(["eval", "--frames", "21", "--num-clips", "1", "--model", str(base),
                 "--long-model", "nbp_long"]) == 2
    assert "'nbp_long' is not in" in capsys.readouterr().err
    assert main(["eval", "--num-clips", "1", "--long-model", "nbp"]) == 2
    assert "--long-model: applies to long videos" in capsys.readouterr().err
