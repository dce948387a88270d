"""Scale-out: 2 processes under torchrun (gloo, CPU) == 1 process on the same global batch."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from nbp import NBPTransformer, TransformerConfig
from nbp.data import TokenDataset
from nbp.train import LoopConfig, OptimConfig, TransformerTrainConfig, train_transformer
from nbp.train.checkpoint import read_checkpoint
from nbp.train.distributed import DistEnv, global_batch_indices, local_batch_indices

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch, torch.distributed as dist
    from nbp.data import TokenDataset
    from nbp.train import TransformerTrainConfig, train_transformer

    dist.init_process_group("gloo")   # kept alive so an FSDP2 model can be gathered afterwards
    cfg = TransformerTrainConfig(**json.loads(open(sys.argv[1]).read()))
    model = train_transformer(cfg, TokenDataset(sys.argv[2]))
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
          for k, v in model.state_dict().items()}
    torch.save(sd, os.path.join(cfg.out_dir, f"rank{dist.get_rank()}.pt"))
    dist.destroy_process_group()
''')


def make(out, fsdp=False) -> TransformerTrainConfig:
    model = TransformerConfig.from_preset("tiny", bov=True, cond_len=1, cond_vocab_size=6,
                                          vocab_size=1 + 6 + 64)
    return TransformerTrainConfig(model=model, out_dir=str(out), p_drop_cond=0.25, loop=LoopConfig(
        steps=4, global_batch=4, log_every=1, fsdp=fsdp, progress=False,
        optim=OptimConfig(lr=3e-3, warmup_steps=1)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (20, 3, 4, 4), generator=g)
    save_file({"codes": codes.int(), "labels": torch.randint(0, 6, (20,), generator=g)},
              str(root / "codes.safetensors"))
    (root / "run.py").write_text(SCRIPT)
    return root


def torchrun(root, out, fsdp, **loop):
    cfg = make(out, fsdp)
    spec = root / f"cfg_{int(fsdp)}.json"
    spec.write_text(json.dumps({"model": cfg.model.to_dict(), "out_dir": str(out),
                                "p_drop_cond": cfg.p_drop_cond, "loop": {**cfg.loop.to_dict(), **loop}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "run.py"), str(spec), str(root / "codes.safetensors")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_ranks_equal_one_process(setup, tmp_path, fsdp):
    if fsdp:  # FSDP2 also stops half-way and resumes from its (full, unsharded) checkpoint
        torchrun(setup, tmp_path / "multi", fsdp, stop_at=2)
        assert read_checkpoint(tmp_path / "multi" / "checkpoint.pt")["step"] == 2
    ranks = torchrun(setup, tmp_path / "multi", fsdp, resume="auto")
    ref = train_transformer(make(tmp_path / "single"), TokenDataset(setup / "codes.safetensors"))
    ref = ref.state_dict()
    assert ranks[0].keys() == ref.keys()
    for k in ref:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks differ on {k}"
        assert torch.allclose(ranks[0][k], ref[k], atol=1e-4, rtol=1e-4), k
    # the checkpoint written under torchrun loads on one process
    ckpt = read_checkpoint(tmp_path / "multi" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    model = NBPTransformer(TransformerConfig.from_dict(ckpt["identity"]["model"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["model"].items()})
    for k, v in model.state_dict().items():
        assert torch.equal(v, ranks[0][k]), k
    # the loss log agrees with the single-process run step by step
    assert _losses(tmp_path / "multi") == pytest.approx(_losses(tmp_path / "single"), rel=1e-4)


def test_global_batch_is_sharded_deterministically():
    a = [global_batch_indices(s, 6, 10, seed=3) for s in range(5)]
    assert a == [global_batch_indices(s, 6, 10, seed=3) for s in range(5)]
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10))            # each epoch is a permutation
    assert a != [global_batch_indices(s, 6, 10, seed=4) for s in range(5)]
    envs = [DistEnv(rank=r, world_size=3) for r in range(3)]
    for s in range(5):
        assert sum((local_batch_indices(s, 6, 10, 3, e) for e in envs), []) == a[s]
    with pytest.raises(ValueError, match="global_batch"):
        local_batch_indices(0, 5, 10, 3, envs[0])
