"""Copy trained demo models into nbp/assets/demo as float16 native dirs.

Usage: python scripts/export_demo.py RUNS_DIR [OUT_DIR]

RUNS_DIR holds the outputs of scripts/train_demo.sh: ``tok_ft`` (the tokenizer after
decoder fine-tuning; ``tok/model`` when absent), ``nbp/model``, ``ntp/model`` and, once
step 5 has run, ``nbp_long/model`` (NBP fine-tuned on windows of long clips). Each is
loaded, cast to float16 (halving the shipped size; ``nbp.demo.load_demo`` casts back to
float32) and saved with ``save_pretrained`` into OUT_DIR/{tokenizer,nbp,ntp,nbp_long}
(default: the package's ``nbp/assets/demo``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nbp.demo import DEMO_DIR
from nbp.model import NBPTransformer
from nbp.tokenizer import VideoTokenizer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", help="directory with tok/model, nbp/model, ntp/model [, nbp_long/model]")
    p.add_argument("out", nargs="?", default=str(DEMO_DIR), help="destination (default: nbp/assets/demo)")
    args = p.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    tok_dir = runs / "tok_ft" if (runs / "tok_ft" / "model.safetensors").is_file() else runs / "tok" / "model"
    sources = {"tokenizer": (tok_dir, VideoTokenizer),
               "nbp": (runs / "nbp" / "model", NBPTransformer),
               "ntp": (runs / "ntp" / "model", NBPTransformer)}
    for name, (src, _) in sources.items():
        if not (src / "model.safetensors").is_file():
            raise SystemExit(f"export_demo: {src} is not a native model dir (train it first)")
    if (runs / "nbp_long" / "model" / "model.safetensors").is_file():
        sources["nbp_long"] = (runs / "nbp_long" / "model", NBPTransformer)
    else:
        print(f"{runs / 'nbp_long' / 'model'}: not trained yet (step 5 of train_demo.sh); "
              f"nbp_long not exported")
    for name, (src, cls) in sources.items():
        cls.from_pretrained(src, dtype=torch.float16).save_pretrained(out / name)
        size = (out / name / "model.safetensors").stat().st_size
        print(f"{src} -> {out / name} ({size / 1e6:.2f} MB, float16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
