"""Export a native model dir from an ``nbp train`` checkpoint (e.g. a run ended with --stop-at).

Usage: python scripts/ckpt_to_native.py RUN_DIR

Reads RUN_DIR/train_config.json (the model kind and config) and RUN_DIR/checkpoint.pt
(the weights at the checkpoint's step) and writes RUN_DIR/model, as ``nbp train`` does
when a run reaches its last step.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from nbp.config import ConfigError
from nbp.model import NBPTransformer
from nbp.tokenizer import VideoTokenizer
from nbp.train.checkpoint import read_checkpoint


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    run = Path(argv[0])
    cfg = json.loads((run / "train_config.json").read_text())
    ckpt = read_checkpoint(run / "checkpoint.pt")
    # The trainers wrap the model in their objective module (``model.`` / ``tokenizer.``).
    state = {k.removeprefix("model.").removeprefix("tokenizer."): v for k, v in ckpt["model"].items()}
    kinds = {"tokenizer": VideoTokenizer, "transformer": NBPTransformer}
    if cfg.get("kind") not in kinds:
        raise SystemExit(f"ckpt_to_native: unknown run kind {cfg.get('kind')!r}; expected one of {sorted(kinds)}")
    cls = kinds[cfg["kind"]]
    try:
        config = cls.config_class.from_dict(cfg.get("model"))
    except ConfigError as e:
        raise SystemExit(f"ckpt_to_native: {run / 'train_config.json'}: invalid model config ({e})") from e
    model = cls(config)
    model.load_state_dict(state)
    out = model.save_pretrained(run / "model")
    print(f"{run / 'checkpoint.pt'} (step {ckpt['step']}) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
