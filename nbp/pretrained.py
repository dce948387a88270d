"""``save_pretrained`` / ``from_pretrained`` for modules built from one config.

A neutral mixin, so that the model modules need not import a loader: the
native format itself (:mod:`nbp.native`) is generic over the module class.
"""
from __future__ import annotations

from pathlib import Path

from .native import load_native, save_native

__all__ = ["Pretrained"]


class Pretrained:
    """Mixin for an ``nn.Module`` constructed as ``cls(config)``.

    Subclasses set ``config_class`` (a :class:`~nbp.config.JsonConfig`
    dataclass) and ``model_type`` (the tag written into config.json, which a
    load checks).
    """

    config_class: type
    model_type: str

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` (atomically)."""
        return save_native(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device=None, dtype=None):
        """Load a directory written by :meth:`save_pretrained` (eval mode; LoadError when it does not fit)."""
        return load_native(cls, path, device=device, dtype=dtype)
