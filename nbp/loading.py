"""Compatibility re-exports: the loaders now live in :mod:`nbp.published` and :mod:`nbp.native`.

New code imports ``load_transformer`` / ``load_tokenizer`` / ``LoadError`` from
``nbp`` and uses ``NBPTransformer`` / ``VideoTokenizer`` ``.save_pretrained``
and ``.from_pretrained`` for native directories.
"""
from __future__ import annotations

from .model import NBPTransformer
from .native import CONFIG_FILE, WEIGHTS_FILE, LoadError, save_native
from .published import load_tokenizer, load_transformer, transformer_config_from_published
from .tokenizer import VideoTokenizer

__all__ = ["LoadError", "load_transformer", "load_tokenizer", "save_transformer", "save_tokenizer",
           "transformer_from_pretrained", "tokenizer_from_pretrained",
           "transformer_config_from_published", "CONFIG_FILE", "WEIGHTS_FILE"]

save_transformer = save_tokenizer = save_native
transformer_from_pretrained = NBPTransformer.from_pretrained
tokenizer_from_pretrained = VideoTokenizer.from_pretrained
