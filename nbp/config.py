"""Model configurations: dataclasses with named presets, saved as JSON.

Every field is checked for type and range when a config is made (from code,
a preset or a JSON file), so a bad config.json fails with a ConfigError
naming the field before any model is built from it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TransformerConfig", "TRANSFORMER_PRESETS", "ConfigError", "JsonConfig"]


class ConfigError(ValueError):
    """A configuration is inconsistent or names an unknown preset."""


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int (bools and floats such as 2.5 are refused), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name}: expected an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}: expected an int >= {minimum}, got {value}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r} ({type(value).__name__})")
    return value


def check_float(name: str, value, lo: float, hi: float) -> float:
    """``value`` as a float in [lo, hi)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not lo <= value < hi:
        raise ConfigError(f"{name}: expected a number in [{lo}, {hi}), got {value!r}")
    return float(value)


def check_ints(name: str, value, *, length: int | None = None, minimum: int = 1) -> tuple[int, ...]:
    """A non-empty list/tuple of ints >= ``minimum`` (of ``length`` entries when given), as a tuple."""
    want = f"{length or 'a non-empty list of'} ints >= {minimum}"
    if not isinstance(value, (list, tuple)) or not value or (length is not None and len(value) != length):
        raise ConfigError(f"{name}: expected {want}, got {value!r}")
    return tuple(check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(value))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


class JsonConfig:
    """JSON (de)serialisation and named presets, shared by the config dataclasses.

    Subclasses are dataclasses and set ``preset_kind`` (used in messages) and
    implement ``presets()`` returning their name -> config table.
    """

    preset_kind = "config"

    @classmethod
    def presets(cls) -> dict:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object of {cls.__name__} fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides):
        table = cls.presets()
        if name not in table:
            raise ConfigError(f"unknown {cls.preset_kind} preset {name!r}; expected one of {sorted(table)}")
        return dataclasses.replace(table[name], **overrides)


@dataclass
class TransformerConfig(JsonConfig):
    """The published GPT-2 style NBP generator (docs/published-checkpoints.md).

    ``hybrid``, ``bov``, ``cond_len`` and ``cond_vocab_size`` fix the token
    layout (``cond_offset``, ``video_offset``, ``bov_id``); how ids are built
    from them is ``nbp.layout`` (docs/design.md, "Token layout").
    """

    vocab_size: int = 64000
    n_layer: int = 24
    n_head: int = 16
    n_embd: int = 1536
    max_seq_len: int = 5120          # length of the learned position table
    latent_shape: tuple = (5, 16, 16)  # (t, h, w) code grid of one clip
    block_shape: tuple = (1, 1, 16)  # (bt, bh, bw); L = bt * bh * bw tokens per step
    hybrid: bool = False             # causal start of L tokens, then blocks (UCF models)
    bov: bool = False                # sequence starts with a begin-of-video id
    cond_len: int = 0                # condition tokens per sequence (8 text tokens, 1 class)
    cond_vocab_size: int = 0         # condition vocabulary T (text or classes)
    codebook_size: int = 64000       # tokenizer codes
    dropout: float = 0.0             # embedding, attention-output and MLP dropout (training)

    preset_kind = "transformer"

    @classmethod
    def presets(cls) -> dict:
        return TRANSFORMER_PRESETS

    def __post_init__(self):
        self.latent_shape = check_ints("latent_shape", self.latent_shape, length=3)
        self.block_shape = check_ints("block_shape", self.block_shape, length=3)
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len", "codebook_size"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        for name in ("cond_len", "cond_vocab_size"):
            setattr(self, name, check_int(name, getattr(self, name), 0))
        self.hybrid = check_bool("hybrid", self.hybrid)
        self.bov = check_bool("bov", self.bov)
        self.dropout = check_float("dropout", self.dropout, 0.0, 1.0)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for g, b, axis in zip(self.latent_shape, self.block_shape, "thw"):
            if g % b:
                raise ConfigError(f"block_shape {self.block_shape} does not tile latent_shape "
                                  f"{self.latent_shape}: {axis} = {g} is not divisible by {b}")
        if self.hybrid and not self.bov:
            raise ConfigError("hybrid models start with a begin-of-video id: set bov=True")
        if self.video_offset + self.codebook_size > self.vocab_size:
            raise ConfigError(f"vocab_size {self.vocab_size} is smaller than the layout needs: "
                              f"video ids start at {self.video_offset} and there are "
                              f"{self.codebook_size} codes")
        if self.context_len > self.max_seq_len:
            raise ConfigError(f"max_seq_len: the position table has {self.max_seq_len} rows, but a clip "
                              f"of latent_shape {self.latent_shape} needs {self.context_len} positions "
                              "(the condition, begin-of-video and video tokens of its layout, "
                              "less the last block, which is only predicted)")

    @property
    def block_size(self) -> int:
        """L, tokens generated per step."""
        return math.prod(self.block_shape)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def video_len(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def context_len(self) -> int:
        """Positions a whole clip occupies: the teacher-forced input length (the last block of L
        tokens is only predicted, never fed), which generation never exceeds either."""
        if self.hybrid:  # [cond, bov, z_0..z_{L-1}, L-1 fillers, z_L..] minus the last L
            return self.cond_len + self.video_len
        return self.cond_len + self.block_size * int(self.bov) + self.video_len - self.block_size

    @property
    def cond_offset(self) -> int:
        """Id of condition token 0."""
        return self.block_size if self.hybrid else int(self.bov)

    @property
    def video_offset(self) -> int:
        """Id of video code 0."""
        return self.cond_offset + self.cond_vocab_size

    @property
    def bov_id(self) -> int:
        return 0


_K600 = dict(vocab_size=64000, latent_shape=(5, 16, 16), block_shape=(1, 1, 16))
# UCF: LLaMA-2 text vocabulary (32000) shifted by L, 8 text tokens, hybrid start.
_UCF = dict(vocab_size=64000 + 32000 + 16, latent_shape=(5, 16, 16), block_shape=(1, 1, 16),
            hybrid=True, bov=True, cond_len=8, cond_vocab_size=32000)

TRANSFORMER_PRESETS: dict[str, TransformerConfig] = {
    "k600-base": TransformerConfig(n_layer=24, n_head=16, n_embd=1536, **_K600),
    "k600-xl": TransformerConfig(n_layer=24, n_head=32, n_embd=2048, **_K600),
    "k600-3b": TransformerConfig(n_layer=32, n_head=32, n_embd=3072, **_K600),
    "ucf-base": TransformerConfig(n_layer=24, n_head=16, n_embd=1536, **_UCF),
    "ucf-3b": TransformerConfig(n_layer=32, n_head=32, n_embd=3072, **_UCF),
    # Small models for tests and CPU work.
    "tiny": TransformerConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, max_seq_len=128,
                              latent_shape=(3, 4, 4), block_shape=(1, 1, 4), codebook_size=64),
    "tiny-hybrid": TransformerConfig(vocab_size=4 + 10 + 64, n_layer=2, n_head=2, n_embd=32,
                                     max_seq_len=128, latent_shape=(3, 4, 4), block_shape=(1, 1, 4),
                                     hybrid=True, bov=True, cond_len=3, cond_vocab_size=10,
                                     codebook_size=64),
}
