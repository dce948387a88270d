"""Pre-extracted token datasets: encode a video dataset once, train the transformer on the codes.

The cache is one safetensors file holding ``codes`` (int32 [N, t, h, w], the
tokenizer's raster-order codes) and ``labels`` (int64 [N]); its metadata holds
a JSON description of the data and the tokenizer (``nbp_tokens``), so the
transformer trainer can check that its latent grid and codebook match.
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

__all__ = ["extract_tokens", "TokenDataset"]


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
