"""nbp: a fast, verified engine for Next-Block Prediction video generation."""
from __future__ import annotations

from .config import TRANSFORMER_PRESETS, ConfigError, TransformerConfig
from .model import NBPTransformer

__version__ = "0.1.0"

__all__ = [
    "TransformerConfig", "TRANSFORMER_PRESETS", "ConfigError", "NBPTransformer",
    "__version__",
]
