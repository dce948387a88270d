"""nbp: a fast, verified engine for Next-Block Prediction video generation."""
from __future__ import annotations

# Before torch is imported: libgomp (torch's OpenMP) reads its wait policy once,
# when torch loads it (nbp/_wait_policy.py: a short spin on an idle machine,
# sleeping waits on a busy one; an explicit setting is kept).
from ._wait_policy import choose_wait_policy

choose_wait_policy()

from .config import TRANSFORMER_PRESETS, ConfigError, TransformerConfig
from .model import NBPTransformer
from .tokenizer import TOKENIZER_PRESETS, TokenizerConfig, VideoTokenizer
from .native import LoadError
from .published import load_tokenizer, load_transformer
from .generate import FastGenerator

__version__ = "0.1.0"

__all__ = [
    "TransformerConfig", "TRANSFORMER_PRESETS", "ConfigError", "NBPTransformer",
    "TokenizerConfig", "TOKENIZER_PRESETS", "VideoTokenizer", "LoadError", "load_tokenizer",
    "load_transformer", "FastGenerator", "__version__",
]
