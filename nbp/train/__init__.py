"""Training: NBP / NTP / hybrid transformers and the video tokenizer, on one process or under torchrun.

Command line (``nbp train --help``)::

    nbp train tokenizer   --out runs/tok --data synthetic --resolution 32 --steps 3000 --threads 1
    nbp train tokens      --tokenizer runs/tok/model --out runs/codes.safetensors \\
                          --data synthetic --resolution 32
    nbp train transformer --out runs/nbp --tokens runs/codes.safetensors --block-shape 1 1 4 \\
                          --classes 12 --p-drop-cond 0.1 --n-layer 4 --n-embd 256 --n-head 4
    torchrun --nproc_per_node 8 -m nbp.cli train transformer ... [--fsdp]

Python::

    from nbp.train import TransformerTrainConfig, LoopConfig, OptimConfig, train_transformer
    model = train_transformer(TransformerTrainConfig(model=cfg, out_dir="runs/nbp",
                                                     tokens="runs/codes.safetensors",
                                                     loop=LoopConfig(steps=3000, global_batch=16)))

Each run writes ``out_dir/checkpoint.pt`` (exact resume: ``--resume``),
``out_dir/log.jsonl`` (one JSON object per logged step), ``train_config.json``
and, with every checkpoint, the loadable native model dir ``out_dir/model``.
Ctrl-C checkpoints and raises ``loop.Interrupted``; see ``loop`` and ``run_files``.
"""
from .loop import LoopConfig
from .optim import OptimConfig
from .tokenizer import TokenizerTrainConfig, train_tokenizer
from .transformer import TransformerTrainConfig, build_sequences, train_transformer

__all__ = ["LoopConfig", "OptimConfig", "TransformerTrainConfig", "build_sequences",
           "train_transformer", "TokenizerTrainConfig", "train_tokenizer"]
