"""nbp.train: sequence construction, optimiser groups and schedule, gradients, tiny runs, CLI."""
import json
import math

import pytest
import torch

import nbp_kernels
from nbp import NBPTransformer, TransformerConfig
from nbp.blocks import to_block_order
from nbp.data import SyntheticVideos, TokenDataset, extract_tokens
from nbp.tokenizer import TokenizerConfig, VideoTokenizer
from nbp.train import (LoopConfig, OptimConfig, TokenizerTrainConfig, TransformerTrainConfig,
                       build_sequences, train_tokenizer, train_transformer)
from nbp.train.optim import lr_factor, param_groups
from nbp.train.transformer import LMObjective


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**over) -> TransformerConfig:
    return TransformerConfig.from_preset("tiny", **over)


def published_sequences(c_raw, z_raw, cfg):
    """The published process_b_c_z_a + forward (nbp/lm_transformer.py), transcribed.

    Returns (model input, targets scored against the logits after ``cut_len``, cut_len).
    """
    L, B = cfg.block_size, z_raw.shape[0]
    if cfg.hybrid:
        c, z = c_raw + L, z_raw + cfg.cond_vocab_size + L
        middle = torch.arange(1, L).repeat(B, 1)
        a = torch.cat([z[:, :L], middle, z[:, L:]], dim=-1)
        cz = torch.cat([c, torch.zeros(B, 1, dtype=torch.long), a], dim=1)
        return cz[:, :-L], z, c.shape[1]
    assert not cfg.bov  # the published non-hybrid bov path fails its own length assert
    c, z = c_raw, z_raw + cfg.cond_vocab_size
    cz = torch.cat([c, z], dim=1)
    return cz[:, :-L], z[:, L:], c.shape[1]


LAYOUTS = [
    dict(),                                                                    # K600: unconditional
    dict(block_shape=(1, 2, 2)),                                               # any block shape
    dict(cond_len=1, cond_vocab_size=5, vocab_size=5 + 64),                    # class, no bov
    dict(hybrid=True, bov=True, cond_len=3, cond_vocab_size=7, vocab_size=4 + 7 + 64),
    dict(hybrid=True, bov=True, cond_len=1, cond_vocab_size=7, block_shape=(1, 1, 1),
         vocab_size=1 + 7 + 64),
]


@pytest.mark.parametrize("over", LAYOUTS)
def test_sequences_match_published_training(over):
    cfg = tiny(**over)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (3, *cfg.latent_shape), generator=g)
    cond = torch.randint(0, max(cfg.cond_vocab_size, 1), (3, cfg.cond_len), generator=g)
    ids, targets = build_sequences(codes, cond if cfg.cond_len else None, cfg)
    z_raw = to_block_order(codes, cfg.block_shape)
    pub_in, pub_tgt, cut = published_sequences(cond, z_raw, cfg)
    assert torch.equal(ids, pub_in)
    assert torch.equal(targets[:, cut:], pub_tgt)
    assert (targets[:, :cut] == -100).all()


@pytest.mark.parametrize("over", [dict(), dict(block_shape=(1, 2, 2)),
                                  dict(bov=True, cond_len=1, cond_vocab_size=5, vocab_size=1 + 5 + 64),
                                  dict(bov=True, cond_len=1, cond_vocab_size=5, vocab_size=1 + 5 + 64,
                                       block_shape=(1, 1, 1))])
def test_position_p_predicts_p_plus_L(over):
    """Non-hybrid layouts (bov included): every scored position p targets seq[p + L]."""
    cfg = tiny(**over)
    codes = torch.randint(0, 64, (2, *cfg.latent_shape), generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([[3], [1]]) if cfg.cond_len else None
    ids, targets = build_sequences(codes, cond, cfg)
    L, C = cfg.block_size, cfg.cond_len
    full = torch.cat([ids, to_block_order(codes, cfg.block_shape)[:, -L:] + cfg.video_offset], dim=1)
    scored = targets[:, C:]
    assert (scored != -100).all()
    assert torch.equal(scored, full[:, C + L:])
    n_scored = cfg.video_len if cfg.bov else cfg.video_len - L   # with bov every code is a target
    assert scored.shape[1] == n_scored
    if cfg.bov:
        assert (ids[:, C:C + L] == cfg.bov_id).all() and (ids[:, :C] == cond + cfg.cond_offset).all()


def test_sequences_bad_inputs():
    cfg = tiny()
    with pytest.raises(ValueError, match="codes"):
        build_sequences(torch.zeros(1, 3, 4, 5, dtype=torch.long), None, cfg)
    with pytest.raises(ValueError, match="codebook_size"):
        build_sequences(torch.full((1, 3, 4, 4), 64), None, cfg)
    ccfg = tiny(cond_len=1, cond_vocab_size=5, vocab_size=69)
    with pytest.raises(ValueError, match="cond"):
        build_sequences(torch.zeros(1, 3, 4, 4, dtype=torch.long), None, ccfg)
    with pytest.raises(ValueError, match="block_shape"):
        tiny(block_shape=(1, 3, 1))


def test_weight_decay_only_on_matrices():
    model = NBPTransformer(tiny())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    # exactly the Linear weights (the published minGPT rule)
    expected = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert decayed == expected
    assert "tok_emb.weight" not in decayed and "pos_emb" not in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule():
    cos = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cos, 110) == 0.0 and lr_factor(5, cos, 110) == pytest.approx(0.5)
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cos, 110) == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear")
    assert lr_factor(25, lin, 100) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="step")


def _mask_attend(S, L, hybrid):
    def factory(cond_len):
        mask = nbp_kernels.nbp_mask(S, block_size=L, cond_len=cond_len, hybrid=hybrid)
        return lambda q, k, v, i: nbp_kernels.reference.masked_attention(q, k, v, mask)
    return factory


def _grads(objective, ids, targets, drop):
    objective.model.zero_grad(set_to_none=True)
    loss = objective(ids, targets, drop)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.model.named_parameters()
                           if p.grad is not None}


BACKENDS = ["torch"] + (["triton"] if nbp_kernels.backend_status("triton", "cpu")[0] else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over", [dict(block_shape=(1, 2, 2)),
                                  dict(hybrid=True, bov=True, cond_len=2, cond_vocab_size=5,
                                       vocab_size=4 + 5 + 64)])
def test_training_gradients_match_reference_mask(backend, over):
    """A training step through block_causal_attention == through masked_attention(nbp_mask)."""
    cfg = tiny(n_embd=128, n_head=2, n_layer=1, latent_shape=(2, 2, 4), **over)
    torch.manual_seed(0)
    model = NBPTransformer(cfg)
    codes = torch.randint(0, 64, (2, *cfg.latent_shape))
    cond = torch.randint(0, 5, (2, cfg.cond_len)) if cfg.cond_len else None
    ids, targets = build_sequences(codes, cond, cfg)
    drop = torch.tensor([True, False]) if cfg.cond_len else None
    loss_k, g_k = _grads(LMObjective(model, backend=backend), ids, targets, drop)
    ref = LMObjective(model, attend=_mask_attend(ids.shape[1], cfg.block_size, cfg.hybrid))
    loss_r, g_r = _grads(ref, ids, targets, drop)
    assert torch.allclose(loss_k, loss_r, atol=1e-5)
    assert g_k.keys() == g_r.keys() and len(g_k) == len(list(model.parameters()))
    for n in g_r:
        assert torch.allclose(g_k[n], g_r[n], atol=2e-5, rtol=1e-3), n


def test_condition_dropout_uses_uncond_embedding():
    cfg = tiny(bov=True, cond_len=1, cond_vocab_size=5, vocab_size=1 + 5 + 64)
    torch.manual_seed(0)
    model = NBPTransformer(cfg).eval()
    ids, targets = build_sequences(torch.randint(0, 64, (2, 3, 4, 4)), torch.tensor([[1], [4]]), cfg)
    obj = LMObjective(model, backend="torch")
    ce = lambda logits: torch.nn.functional.cross_entropy(  # noqa: E731
        logits[:, 1:].flatten(0, 1), targets[:, 1:].flatten())
    kept = ce(model(ids, 1, backend="torch"))
    dropped = ce(model(ids, 1, backend="torch", prefix_embeddings=model.uncond_embedding))
    assert torch.allclose(obj(ids, targets, torch.tensor([False, False])), kept, atol=1e-6)
    assert torch.allclose(obj(ids, targets, torch.tensor([True, True])), dropped, atol=1e-6)
    assert not torch.allclose(kept, dropped)
    with pytest.raises(ValueError, match="p_drop_cond"):
        TransformerTrainConfig(model=tiny(), out_dir="x", p_drop_cond=0.1)


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def synthetic_tokens(tmp_path_factory):
    """Codes of 48 synthetic 9x16x16 clips under a tokenizer trained for a few steps."""
    root = tmp_path_factory.mktemp("tok")
    data = SyntheticVideos(48, resolution=16, num_frames=9, seed=3)
    cfg = TokenizerTrainConfig(model=TokenizerConfig.from_preset("tiny"), out_dir=str(root / "run"),
                               loop=LoopConfig(steps=20, global_batch=4, log_every=5, progress=False,
                                               optim=OptimConfig(lr=3e-3, warmup_steps=5)))
    tok = train_tokenizer(cfg, data)
    path = extract_tokens(tok, data, root / "codes.safetensors", batch_size=16, progress=False)
    return root, path


def test_tokenizer_training_lowers_loss(synthetic_tokens):
    root, _ = synthetic_tokens
    log = _log(root / "run")
    assert log[-1]["step"] == 20
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], log
    assert log[-1]["psnr"] > log[0]["psnr"] + 3.0, log
    assert (root / "run" / "model" / "model.safetensors").is_file()
    tok = VideoTokenizer.from_pretrained(root / "run" / "model")
    assert tok.config == TokenizerConfig.from_preset("tiny")


def test_transformer_training_lowers_loss(synthetic_tokens, tmp_path):
    _, path = synthetic_tokens
    data = TokenDataset(path)
    cfg = tiny(latent_shape=data.latent_shape, block_shape=(1, 1, 2), n_embd=64, n_head=2,
               bov=True, cond_len=1, cond_vocab_size=12, vocab_size=1 + 12 + 64)
    run = TransformerTrainConfig(model=cfg, out_dir=str(tmp_path), p_drop_cond=0.1,
                                 loop=LoopConfig(steps=60, global_batch=8, log_every=10, progress=False,
                                                 optim=OptimConfig(lr=3e-3, warmup_steps=5)))
    model = train_transformer(run, data)
    log = _log(tmp_path)
    assert log[0]["loss"] > 3.0                               # mean of steps 1-10: near-uniform start
    assert log[-1]["loss"] < log[0]["loss"] - 1.0, log

    loaded = NBPTransformer.from_pretrained(tmp_path / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_cli_trains_and_exports(tmp_path, synthetic_tokens):
    from nbp.cli import main

    _, path = synthetic_tokens
    out = tmp_path / "ntp"
    rc = main(["train", "transformer", "--tokens", str(path), "--out", str(out), "--steps", "3",
               "--batch", "2", "--block-shape", "1", "1", "1", "--classes", "12",
               "--no-progress", "--log-every", "1"])
    assert rc == 0 and len(_log(out)) == 3
    m = NBPTransformer.from_pretrained(out / "model")
    assert m.config.block_size == 1 and m.config.cond_len == 1 and m.config.bov
    assert m.config.latent_shape == TokenDataset(path).latent_shape


def test_cli_bad_block_shape_writes_nothing(tmp_path, synthetic_tokens, capsys):
    from nbp.cli import main

    _, path = synthetic_tokens
    out = tmp_path / "bad"
    rc = main(["train", "transformer", "--tokens", str(path), "--out", str(out), "--steps", "3",
               "--block-shape", "1", "3", "1", "--no-progress"])
    assert rc == 2
    assert "block_shape" in capsys.readouterr().err
    assert not out.exists()


def test_soft_quantization_warmup_rounds_to_the_hard_codes():
    from nbp.train.tokenizer import TokenizerObjective

    torch.manual_seed(0)
    tok = VideoTokenizer(TokenizerConfig.from_preset("tiny"))
    video = SyntheticVideos(2, resolution=16, num_frames=5, seed=0)[0]["video"][None]
    obj = TokenizerObjective(tok, "mse")
    soft_loss, _ = obj(video, soft=True)
    hard_loss, _ = obj(video, soft=False)
    assert torch.isfinite(soft_loss) and not torch.equal(soft_loss, hard_loss)
    z = tok.encode_latents(video).movedim(1, -1)
    half = torch.tensor([lv // 2 for lv in tok.quantizer.levels], dtype=torch.float32)
    soft = tok.quantizer.bound(z) / half
    hard, _ = tok.quantize(tok.encode_latents(video))
    assert torch.equal((soft * half).round() / half, hard.movedim(1, -1))
    with pytest.raises(ValueError, match="soft_steps"):
        TokenizerTrainConfig(model=TokenizerConfig.from_preset("tiny"), out_dir="x", soft_steps=-1)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("over", [dict(block_shape=(1, 2, 2)),
                                  dict(hybrid=True, bov=True, cond_len=2, cond_vocab_size=5,
                                       vocab_size=4 + 5 + 64)])
def test_cuda_training_gradients_match_reference_mask(over):
    cfg = tiny(n_embd=128, n_head=2, n_layer=1, latent_shape=(2, 2, 4), **over)
    torch.manual_seed(0)
    model = NBPTransformer(cfg).cuda()
    codes = torch.randint(0, 64, (2, *cfg.latent_shape))
    cond = torch.randint(0, 5, (2, cfg.cond_len)) if cfg.cond_len else None
    ids, targets = (t.cuda() for t in build_sequences(codes, cond, cfg))
    drop = torch.tensor([True, False], device="cuda") if cfg.cond_len else None
    ref = LMObjective(model, attend=lambda c: (lambda q, k, v, i: nbp_kernels.reference.masked_attention(
        q, k, v, nbp_kernels.nbp_mask(ids.shape[1], block_size=cfg.block_size, cond_len=c,
                                      hybrid=cfg.hybrid, device="cuda"))))
    loss_r, g_r = _grads(ref, ids, targets, drop)
    for backend in ("auto", "torch"):
        loss_k, g_k = _grads(LMObjective(model, backend=backend), ids, targets, drop)
        assert torch.allclose(loss_k, loss_r, atol=1e-4), backend
        for n in g_r:
            assert torch.allclose(g_k[n], g_r[n], atol=1e-4, rtol=1e-2), (backend, n)


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_training_runs_and_exports(synthetic_tokens, tmp_path):
    root, path = synthetic_tokens
    data = TokenDataset(path)
    cfg = tiny(latent_shape=data.latent_shape, block_shape=(1, 1, 2), n_embd=128, n_head=2,
               bov=True, cond_len=1, cond_vocab_size=12, vocab_size=1 + 12 + 64)
    run = TransformerTrainConfig(model=cfg, out_dir=str(tmp_path / "lm"), p_drop_cond=0.1,
                                 loop=LoopConfig(steps=60, global_batch=8, log_every=10, device="cuda",
                                                 progress=False, optim=OptimConfig(lr=3e-3, warmup_steps=5)))
    model = train_transformer(run, data)
    assert next(model.parameters()).is_cuda
    log = _log(tmp_path / "lm")
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"] - 1.0, log
    tcfg = TokenizerTrainConfig(model=TokenizerConfig.from_preset("tiny"), out_dir=str(tmp_path / "tok"),
                                loop=LoopConfig(steps=5, global_batch=4, log_every=1, device="cuda",
                                                progress=False))
    tok = train_tokenizer(tcfg, SyntheticVideos(8, resolution=16, num_frames=9, seed=3))
    assert next(tok.parameters()).is_cuda
    assert VideoTokenizer.from_pretrained(tmp_path / "tok" / "model").config == tcfg.model


def test_cli_pipeline_tokenizer_tokens_hybrid(tmp_path):
    """nbp train tokenizer -> nbp train tokens -> nbp train transformer (hybrid, class-conditional)."""
    from nbp.cli import main

    data = ["--data", "synthetic", "--resolution", "16", "--num-frames", "9", "--num-clips", "6"]
    assert main(["train", "tokenizer", "--out", str(tmp_path / "tok"), *data, "--steps", "2",
                 "--batch", "2", "--threads", "1", "--no-progress"]) == 0
    codes = tmp_path / "codes.safetensors"
    assert main(["train", "tokens", "--tokenizer", str(tmp_path / "tok" / "model"), "--out", str(codes),
                 *data, "--no-progress"]) == 0
    cache = TokenDataset(codes)
    assert cache.latent_shape == (3, 2, 2) and len(cache) == 6
    assert main(["train", "transformer", "--tokens", str(codes), "--out", str(tmp_path / "lm"),
                 "--block-shape", "1", "1", "2", "--hybrid", "true", "--classes", "12",
                 "--p-drop-cond", "0.2", "--steps", "2", "--batch", "2", "--no-progress"]) == 0
    cfg = NBPTransformer.from_pretrained(tmp_path / "lm" / "model").config
    assert cfg.hybrid and cfg.bov and cfg.cond_len == 1 and cfg.block_size == 2
    assert cfg.vocab_size == 2 + 12 + 64 and cfg.max_seq_len == 1 + 12


def test_step_batches_are_the_same_with_worker_processes():
    from nbp.train.distributed import DistEnv
    from nbp.train.loop import step_batches

    data = SyntheticVideos(10, resolution=8, num_frames=3, seed=4)
    loop = LoopConfig(global_batch=4, seed=2)

    def collate(items):
        return torch.stack([it["video"] for it in items])

    inline = list(step_batches(data, loop, DistEnv(), collate)(3, 6))
    workers = list(step_batches(data, loop, DistEnv(), collate, num_workers=1)(3, 6))
    assert len(inline) == len(workers) == 3
    assert all(torch.equal(a, b) for a, b in zip(inline, workers))
    rank1 = list(step_batches(data, loop, DistEnv(rank=1, world_size=2), collate)(3, 6))
    assert all(torch.equal(a[2:], b) for a, b in zip(inline, rank1))
