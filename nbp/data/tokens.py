"""Pre-extracted token datasets: encode a video dataset once, train the transformer on the codes.

The cache is one safetensors file holding ``codes`` (int32 [N, t, h, w], the
tokenizer's raster-order codes) and ``labels`` (int64 [N]); its metadata holds
a JSON description of the data and the tokenizer (``nbp_tokens``), so the
transformer trainer can check that its latent grid and codebook match. A cache of
longer clips than the model's latent length trains on windows of them
(``window_starts`` / ``crop_windows``; ``TransformerTrainConfig.crop_frames``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..io import atomic_path

__all__ = ["extract_tokens", "TokenDataset", "window_starts", "crop_windows"]


def _describe(dataset) -> dict:
    describe = getattr(dataset, "describe", None)
    if callable(describe):
        return describe()
    return {"kind": type(dataset).__name__, "num_clips": len(dataset)}


@torch.no_grad()
def extract_tokens(tokenizer, dataset, path: str | Path, *, batch_size: int = 8,
                   device: str | torch.device = "cpu", codebook_size: int | None = None,
                   progress: bool = True) -> Path:
    """Encode every item of ``dataset`` with ``tokenizer.encode`` and cache the codes.

    dataset items: ``{"video": float [3, T, H, W] in [0, 1], "label": int}``.
    tokenizer.encode: float [B, 3, T, H, W] -> integer codes [B, t, h, w].
    Writes ``path`` atomically and returns it.
    """
    if len(dataset) == 0:
        raise ValueError("dataset: expected at least one clip, got an empty dataset")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    was_training = getattr(tokenizer, "training", False)
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    codes, labels = [], []
    bar = tqdm(range(0, len(dataset), batch_size), desc="encode", disable=not progress)
    for start in bar:
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        video = torch.stack([it["video"] for it in items]).to(device)
        codes.append(tokenizer.encode(video).to("cpu", torch.int32))
        labels.append(torch.tensor([int(it.get("label", -1)) for it in items], dtype=torch.int64))
    if was_training:
        tokenizer.train()
    codes_t, labels_t = torch.cat(codes), torch.cat(labels)
    meta = {"data": _describe(dataset), "latent_shape": list(codes_t.shape[1:]),
            "codebook_size": codebook_size if codebook_size is not None
            else getattr(getattr(tokenizer, "config", None), "codebook_size", None)}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({"codes": codes_t.contiguous(), "labels": labels_t}, str(tmp),
                  metadata={"nbp_tokens": json.dumps(meta)})
    return path


class TokenDataset(Dataset):
    """Items ``{"codes": int64 [t, h, w], "label": int}`` from an ``extract_tokens`` file."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokens: no token cache at {str(path)!r} (write one with "
                                    f"nbp.data.extract_tokens or `nbp train transformer --tokenizer`)")
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if not {"codes", "labels"} <= keys:
                raise ValueError(f"tokens: {str(path)!r} is not a token cache: expected tensors "
                                 f"'codes' and 'labels', found {sorted(keys)}")
            self.codes = f.get_tensor("codes").long()
            self.labels = f.get_tensor("labels").long()
            self.meta = json.loads((f.metadata() or {}).get("nbp_tokens", "{}"))
        if self.codes.dim() != 4 or len(self.codes) != len(self.labels) or len(self.codes) == 0:
            raise ValueError(f"tokens: {str(path)!r}: expected codes [N, t, h, w] and labels [N] "
                             f"with N > 0, got {tuple(self.codes.shape)} and "
                             f"{tuple(self.labels.shape)}")
        self.path = path

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.codes.shape[1:])

    def describe(self) -> dict:
        return {"kind": "tokens", "num_clips": len(self), **self.meta}

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, index: int) -> dict:
        return {"codes": self.codes[index], "label": int(self.labels[index])}


def window_starts(step: int, batch: int, num_latent: int, window: int, *, start_prob: float,
                  seed: int) -> torch.Tensor:
    """First latent frame of each clip's training window at ``step``: int64 [batch].

    With probability ``start_prob`` a window starts at 0 (a clip's start, as the first
    window of ``nbp.long_video`` does), otherwise uniformly in ``1 .. num_latent - window``
    (a window mid-clip, as every later one). A function of (seed, step) only, so a resumed
    run and every rank of a distributed one draw the same starts (the caller takes its
    rank's slice of the global batch).
    """
    if not 0 < window <= num_latent:
        raise ValueError(f"window: expected 1..{num_latent} latent frames (the cache's), "
                         f"got {window!r}")
    if not 0.0 <= start_prob <= 1.0:
        raise ValueError(f"start_prob: expected a probability in [0, 1], got {start_prob!r}")
    g = torch.Generator().manual_seed(seed * 104729 + step + 1)
    at_start = torch.rand(batch, generator=g) < start_prob
    last = num_latent - window   # the last start that fits
    mid = torch.randint(1, max(last, 1) + 1, (batch,), generator=g)
    return torch.where(at_start | (last == 0), torch.zeros_like(mid), mid)


def crop_windows(codes: torch.Tensor, starts: torch.Tensor, window: int) -> torch.Tensor:
    """codes int [B, T, h, w], starts int64 [B] -> the windows codes[b, s_b:s_b + window],
    int [B, window, h, w]."""
    if codes.dim() != 4 or starts.shape != codes.shape[:1]:
        raise ValueError(f"codes, starts: expected [B, T, h, w] and [B], got "
                         f"{tuple(codes.shape)} and {tuple(starts.shape)}")
    if len(starts) and (int(starts.min()) < 0 or int(starts.max()) + window > codes.shape[1]):
        raise ValueError(f"starts: windows of {window} latent frames must lie in the "
                         f"{codes.shape[1]} of the clips, got starts in "
                         f"[{int(starts.min())}, {int(starts.max())}]")
    frames = starts[:, None] + torch.arange(window)                     # [B, window]
    return codes[torch.arange(len(codes))[:, None], frames]
