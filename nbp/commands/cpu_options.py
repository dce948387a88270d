"""The CPU flags shared by the commands that compute: ``--threads``, ``--weight-dtype``,
``--act-dtype`` and ``--tokenizer-dtype``."""
from __future__ import annotations

# --weight-dtype values; float32 is FastGenerator's default (weight_dtype=None)
WEIGHT_DTYPES = ("float32", "bfloat16", "int8")
# --act-dtype values; float32 is FastGenerator's default (act_dtype=None)
ACT_DTYPES = ("float32", "int16", "int8", "bfloat16")


def add_threads(p, default: int | None = None, why: str = "") -> None:
    """``--threads N``: CPU threads for torch and the C kernels (``configure_threads``)."""
    base = ("CPU threads for torch and the kernels (default: torch's count; 1 on a busy "
            "machine when OpenMP threads spin-wait)") if default is None else \
        f"CPU threads for torch and the kernels (default {default}{why})"
    p.add_argument("--threads", type=int, default=default, help=base)


def add_weight_dtype(p) -> None:
    """``--weight-dtype``: the decode linears' stored weights (``FastGenerator(weight_dtype=...)``)."""
    p.add_argument("--weight-dtype", default="float32", choices=list(WEIGHT_DTYPES),
                   help="weights of the decode linears and vocabulary head on the CPU: bfloat16 "
                        "or int8 (per-output-channel scales) read fewer bytes per step; needs "
                        "--dtype float32 on the CPU")


def add_act_dtype(p) -> None:
    """``--act-dtype``: the decode linears' activations (``FastGenerator(act_dtype=...)``)."""
    p.add_argument("--act-dtype", default="float32", choices=list(ACT_DTYPES),
                   help="activations of the decode linears on the CPU, rounded per row at each "
                        "call for dot products: int16 (13-15 bits, within ~1e-4 of float32) or "
                        "int8 with --weight-dtype int8 (fastest with AVX512-VNNI); bfloat16 "
                        "with --weight-dtype bfloat16 (faster with AVX512-BF16)")


def add_tokenizer_dtype(p, default: str = "auto") -> None:
    """``--tokenizer-dtype``: the video tokenizer's weights and activations
    (``nbp.devices.tokenizer_dtype``)."""
    from nbp.devices import TOKENIZER_DTYPES

    p.add_argument("--tokenizer-dtype", default=default, choices=list(TOKENIZER_DTYPES),
                   help=f"dtype of the video tokenizer (default {default}; auto: bfloat16 on a "
                        "CPU with native bf16 matmul, AVX512-BF16 or AMX, about 2x faster there "
                        "at the same reconstruction; float32 elsewhere)")


def apply_threads(threads: int | None) -> int:
    """Set the threads (``nbp_kernels.cpu_build.configure_threads``); returns the count set.
    Raises ValueError naming --threads for a count below 1."""
    from nbp_kernels.cpu_build import configure_threads

    if threads is not None and threads < 1:
        raise ValueError(f"--threads: expected a positive int, got {threads}")
    return configure_threads(threads)


def weight_dtype(name: str):
    """The ``FastGenerator`` weight_dtype of a ``--weight-dtype`` value (None for float32)."""
    import torch

    if name not in WEIGHT_DTYPES:
        raise ValueError(f"--weight-dtype: expected one of {list(WEIGHT_DTYPES)}, got {name!r}")
    return None if name == "float32" else getattr(torch, name)


def act_dtype(name: str):
    """The ``FastGenerator`` act_dtype of an ``--act-dtype`` value (None for float32)."""
    import torch

    if name not in ACT_DTYPES:
        raise ValueError(f"--act-dtype: expected one of {list(ACT_DTYPES)}, got {name!r}")
    return None if name == "float32" else getattr(torch, name)
