"""Scale-out: the same trainers under ``torchrun`` (DDP, or FSDP2 with ``fsdp=True``).

The data order is a pure function of (seed, step): every step takes the next
``global_batch`` indices of a seeded per-epoch permutation, and rank ``r`` of
``w`` takes the ``r``-th contiguous slice of ``global_batch / w`` of them. A
run on ``w`` processes therefore sees exactly the global batches of a
one-process run, and resuming needs nothing but the step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["DistEnv", "init_distributed", "shutdown", "wrap_model", "unwrap", "global_batch_indices",
           "local_batch_indices", "all_gather_objects", "broadcast_object", "is_fsdp"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this trainer created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group.

    A group the caller already initialised is used as is (and left alive by ``shutdown``,
    so an FSDP2 model returned by a trainer stays usable).
    Without torchrun (no WORLD_SIZE, or 1) this is a single process. The
    backend is nccl on CUDA and gloo on CPU; each rank uses ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    return DistEnv(rank, world, local, dev, owns)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group if ``init_distributed`` created it (a caller's group stays)."""
    if env.owns_group and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, *, fsdp: bool = False,
               shard_modules: tuple[type, ...] = ()) -> nn.Module:
    """DDP (default) or FSDP2 (``fully_shard`` on each ``shard_modules`` instance, then the root).

    Single process: the model is returned unchanged.
    """
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for m in model.modules():
            if shard_modules and isinstance(m, shard_modules):
                fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user module inside a DDP wrapper (FSDP2 modules are their own root)."""
    return model.module if hasattr(model, "module") and isinstance(
        model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def global_batch_indices(step: int, global_batch: int, num_items: int, seed: int) -> list[int]:
    """Dataset indices of the ``global_batch`` items used at ``step`` (same on every rank)."""
    if num_items < 1:
        raise ValueError("dataset: expected at least one item")
    first = step * global_batch
    out, pos = [], first
    while len(out) < global_batch:
        epoch, offset = divmod(pos, num_items)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
        perm = torch.randperm(num_items, generator=g)
        take = min(global_batch - len(out), num_items - offset)
        out.extend(perm[offset:offset + take].tolist())
        pos += take
    return out


def local_batch_indices(step: int, global_batch: int, num_items: int, seed: int,
                        env: DistEnv) -> list[int]:
    """This rank's contiguous slice of the global batch at ``step``."""
    if global_batch % env.world_size:
        raise ValueError(f"global_batch: {global_batch} is not divisible by the number of "
                         f"processes ({env.world_size})")
    per = global_batch // env.world_size
    idx = global_batch_indices(step, global_batch, num_items, seed)
    return idx[env.rank * per:(env.rank + 1) * per]


def all_gather_objects(obj, env: DistEnv) -> list:
    """[obj of rank 0, obj of rank 1, ...] (a one-element list without torchrun)."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, env: DistEnv, src: int = 0):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
