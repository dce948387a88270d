"""Training: NBP / NTP / hybrid transformers and the video tokenizer, on one process or under torchrun."""
from .loop import LoopConfig
from .optim import OptimConfig
from .tokenizer import TokenizerTrainConfig, train_tokenizer
from .transformer import TransformerTrainConfig, build_sequences, train_transformer

__all__ = ["LoopConfig", "OptimConfig", "TransformerTrainConfig", "build_sequences",
           "train_transformer", "TokenizerTrainConfig", "train_tokenizer"]
