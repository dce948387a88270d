"""nbp: a fast, verified engine for Next-Block Prediction video generation."""
from __future__ import annotations

import os

# Before torch is imported: libgomp (torch's OpenMP) reads its wait policy once,
# when torch loads it. By default idle OpenMP threads spin, taking a shared core
# from the thread that still has work: a K600 decode step with a busy loop on
# the other core of a 2-core machine took 664 ms at 2 threads, 44 ms with
# PASSIVE (benchmarks/results/cpu_threads_under_load*.json). An explicit
# OMP_WAIT_POLICY is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
