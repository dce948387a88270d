"""The published checkpoint formats, and the public loaders ``load_transformer`` / ``load_tokenizer``.

* generator ``.ckpt``: a PyTorch Lightning checkpoint; ``ckpt["state_dict"]``
  holds the generator under ``transformer.`` (the tokenizer may sit beside it
  under ``first_stage_model.``: ignored) and ``ckpt["hyper_parameters"]["args"]``
  the training flags (an ``argparse.Namespace``). Files converted from
  DeepSpeed may lack the flags: pass ``preset=``. Keys may carry ``module.``.
* tokenizer ``.pt``: ``{"model_state_dict": {"module." + name: tensor}, ...}``.

Both loaders also accept native directories (:mod:`nbp.native`). The formats,
the flag -> config mapping and the errors are described in
docs/published-checkpoints.md.

Unpickling is safe by default: files are read with
``torch.load(weights_only=True)``, which rebuilds only tensors, containers and
plain values, plus :data:`SAFE_GLOBALS` (the one class the published files
pickle: ``argparse.Namespace``). A file that pickles anything else is refused
with a LoadError naming the offending global. ``trust_remote_code=True``
(CLI ``--trust-remote-code``) reads it with ``weights_only=False`` instead,
which runs whatever code the file carries: only for files you trust.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .config import TRANSFORMER_PRESETS, ConfigError, TransformerConfig, check_bool, check_int
from .model import NBPTransformer
from .native import CONFIG_FILE, LoadError, build_checked, listing, normalize_keys
from .tokenizer import TokenizerConfig, VideoTokenizer

__all__ = ["SAFE_GLOBALS", "load_transformer", "load_tokenizer", "transformer_config_from_published",
           "read_torch_file", "training_fps"]

# Exactly what the published files pickle beyond torch's weights-only set
# (tensors, dict/OrderedDict/list/tuple/set, str/bytes/int/float/bool/None).
SAFE_GLOBALS = (argparse.Namespace,)


def read_torch_file(path: Path, *, trust_remote_code: bool = False):
    """``torch.load`` a file on the CPU without running code from it (see the module docstring).

    Raises LoadError naming the global that blocked the safe read, or the
    reason the file is unreadable.
    """
    is_zip = zipfile.is_zipfile(path)
    try:
        if trust_remote_code:
            warnings.warn(f"{path}: trust_remote_code=True: unpickling with torch.load(weights_only=False), "
                          "which runs any code the file carries", stacklevel=3)
            return torch.load(path, map_location="cpu", weights_only=False, mmap=is_zip)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            # Memory-map zip checkpoints so that a multi-GB file is not copied into RAM twice.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit is None or trust_remote_code:
            raise LoadError(f"{path}: not a readable torch checkpoint ({_reason(e)})") from e
        raise LoadError(_refusal(path, culprit.group(1))) from e
    except (RuntimeError, KeyError, EOFError, OSError, ValueError) as e:
        raise LoadError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def _reason(e: Exception) -> str:
    """The informative line of an unpickling error (torch's weights-only errors are long)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "WeightsUnpickler" in ln or "Unsupported" in ln]
    return (hits or lines or [type(e).__name__])[0][:300]


def _refusal(path: Path, culprit: str) -> str:
    """The message for a file that pickles ``culprit``, a global outside the allow-list."""
    allowed = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS)
    return (f"{path}: refused to unpickle {culprit}: the file pickles an object outside the allow-list "
            f"(tensors, plain containers and values, {allowed}). Loading it would run code from the "
            "file; pass trust_remote_code=True (CLI --trust-remote-code) only for a file you trust")


# --- the published tokenizer -----------------------------------------------------

def _tokenizer_state(raw, path: Path) -> dict[str, torch.Tensor]:
    """The tokenizer tensors of a published .pt, a plain state dict, or a Lightning .ckpt."""
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):
        return normalize_keys(raw["model_state_dict"], f"{path} model_state_dict")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        # A generator checkpoint that carries its tokenizer as first_stage_model.*.
        state = normalize_keys(raw["state_dict"], f"{path} state_dict")
        prefix = "first_stage_model."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not tensors:
            raise LoadError(f"{path}: a Lightning checkpoint without tokenizer weights (no keys under "
                            f"'{prefix}'); found {listing(sorted(state))}")
        return tensors
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return normalize_keys(raw, f"{path}")
    keys = listing(raw) if isinstance(raw, dict) else type(raw).__name__
    raise LoadError(f"{path}: expected a tokenizer file with 'model_state_dict' (the published "
                    f"magvit2 layout), a Lightning checkpoint or a plain state dict, found {keys}")


def load_tokenizer(path, config: TokenizerConfig | str = "magvit2", device=None, dtype=None, *,
                   trust_remote_code: bool = False) -> VideoTokenizer:
    """Load a tokenizer: a published ``magvit2_*.pt`` file, a native directory,
    or the ``first_stage_model.*`` weights inside a generator ``.ckpt``.

    The published file stores no usable config (only a pickled constructor
    call, which is never unpickled here), so its architecture comes from
    ``config`` (a :class:`TokenizerConfig` or preset name; default the
    released "magvit2"); every tensor name and shape is checked against it.
    ``trust_remote_code`` as in :func:`load_transformer` (the .pt files never need it).
    Returns the tokenizer in eval mode on ``device`` (default CPU).
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"path: {str(path)!r} does not exist")
    if path.is_dir():
        return VideoTokenizer.from_pretrained(path, device=device, dtype=dtype)
    if isinstance(config, str):
        config = TokenizerConfig.from_preset(config)
    tensors = _tokenizer_state(read_torch_file(path, trust_remote_code=trust_remote_code), path)
    return build_checked(VideoTokenizer, config, tensors, f"{path} (tokenizer)", device, dtype)


# --- the published generator ------------------------------------------------------

def _split_lightning(raw, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(transformer tensors without the ``transformer.`` prefix, training flags or None)."""
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        state, hp = raw["state_dict"], raw.get("hyper_parameters")
    elif isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state, hp = raw, None
    else:
        keys = listing(raw) if isinstance(raw, dict) else type(raw).__name__
        raise LoadError(f"{path}: expected a Lightning checkpoint with 'state_dict', found {keys}")
    state = normalize_keys(state, f"{path} state_dict")
    tensors = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    if not tensors and "tok_emb.weight" in state:
        tensors = dict(state)  # a bare generator state dict
    if not tensors:
        raise LoadError(f"{path}: no generator weights; expected keys under 'transformer.' "
                        f"(e.g. transformer.tok_emb.weight), found {listing(sorted(state))}")
    # The published loader drops every key containing 'mask' (attention-mask
    # buffers of older GPT code); drop those, nothing else.
    tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] != "mask"}
    return tensors, _flags(hp, path)


def _flags(hp, path: Path) -> dict | None:
    if hp is None:
        return None
    if not isinstance(hp, dict):
        raise LoadError(f"{path}: hyper_parameters is a {type(hp).__name__}, expected a dict")
    args = hp.get("args")
    if args is None:
        return dict(hp) if "n_layer" in hp else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        raise LoadError(f"{path}: hyper_parameters['args'] is a {type(args).__name__}, "
                        "expected an argparse.Namespace")
    flags = dict(args)
    # Net2NetTransformer takes cond_stage_key as an init argument as well.
    if "cond_stage_key" not in flags and "cond_stage_key" in hp:
        flags["cond_stage_key"] = hp["cond_stage_key"]
    return flags


def _shape_facts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """What the tensors themselves say about the architecture."""
    facts: dict[str, int] = {}
    if "tok_emb.weight" in tensors and tensors["tok_emb.weight"].dim() == 2:
        facts["vocab_size"], facts["n_embd"] = tensors["tok_emb.weight"].shape
    if "pos_emb" in tensors and tensors["pos_emb"].dim() == 3:
        facts["max_seq_len"] = tensors["pos_emb"].shape[1]
    if "uncond_embedding" in tensors and tensors["uncond_embedding"].dim() == 2:
        facts["cond_len"] = tensors["uncond_embedding"].shape[0]
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"blocks\.(\d+)\.", k))}
    if layers:
        facts["n_layer"] = max(layers) + 1
    missing = {"vocab_size", "max_seq_len", "n_layer"} - set(facts)
    if missing:
        raise LoadError(f"generator weights lack {sorted(missing)} information: expected tensors "
                        "tok_emb.weight [V, C], pos_emb [1, S, C] and blocks.{i}.*")
    return facts


# Flags the published model code fills in with hasattr() defaults when a Namespace lacks them.
_PUBLISHED_FLAG_DEFAULTS = {"token_number_per_step": 1, "cond_token_num": 0, "hybrid": False,
                            "starts_with_bov": False, "transformer_dropout": 0.0}
_MAGVIT2 = TokenizerConfig.from_preset("magvit2")
_VTOKENS_CODEBOOK = 16384  # published runs on precomputed tokens (args.vtokens) use this codebook


class _Flags:
    """Training flags with the fallbacks allowed for each (tensor facts, a preset), else an error."""

    def __init__(self, flags: dict, path: str):
        self.f = {**_PUBLISHED_FLAG_DEFAULTS, **{k: v for k, v in flags.items() if v is not None}}
        self.path = path

    def __getitem__(self, name):
        return self.need(name)

    def get(self, name, default=None):
        return self.f.get(name, default)

    def need(self, name: str, fallback=None):
        if name in self.f:
            return self.f[name]
        if fallback is not None:
            return fallback
        raise LoadError(f"{self.path}: training flag {name!r} is missing from hyper_parameters['args'] "
                        f"and cannot be inferred from the weights; pass preset= (one of "
                        f"{sorted(TRANSFORMER_PRESETS)})")

    def as_int(self, name: str, fallback=None, minimum: int = 0) -> int:
        """A flag that must be an int (2.5 or "2" are refused, not rounded)."""
        return self._typed(check_int, name, self.need(name, fallback), minimum)

    def as_bool(self, name: str, fallback=None) -> bool:
        return self._typed(check_bool, name, self.need(name, fallback))

    def _typed(self, check, name, *args):
        try:
            return check(name, *args)
        except ConfigError as e:
            raise LoadError(f"{self.path}: training flag in hyper_parameters['args']: {e}") from e


def _cond_vocab(f: _Flags, facts: dict, codebook: int, n_spe: int, unconditional: bool) -> int:
    """Size of the condition vocabulary, as the published Net2NetTransformer sets it."""
    if unconditional:
        return 0
    key = f.need("cond_stage_key")
    if key == "text":
        # LLaMA-2 tokenizer vocabulary: only the embedding rows know it.
        t = facts["vocab_size"] - codebook - n_spe
        if t < 1:
            raise LoadError(f"{f.path}: a text-conditioned model needs more than {codebook + n_spe} "
                            f"embedding rows, tok_emb.weight has {facts['vocab_size']}")
        return t
    if key == "label":
        return f.as_int("class_cond_dim", minimum=1)
    raise LoadError(f"{f.path}: cond_stage_key {key!r} is not supported; expected 'text' or 'label'")


def _config_from_flags(flags: dict, facts: dict, base: TransformerConfig | None,
                       path: str) -> TransformerConfig:
    f = _Flags(flags, path)
    if f.get("vtokens_pos"):
        raise LoadError(f"{path}: vtokens_pos models (extra box position embeddings) are not supported")
    if f.get("vtokens"):
        codebook = _VTOKENS_CODEBOOK
    elif f.get("tokenizer", "magvit2") == "magvit2":
        codebook = _MAGVIT2.codebook_size
    else:
        raise LoadError(f"{path}: tokenizer {f.get('tokenizer')!r} is not supported; expected 'magvit2'")
    L, hybrid, bov = f.as_int("token_number_per_step", minimum=1), f.as_bool("hybrid"), f.as_bool("starts_with_bov")
    unconditional = f.as_bool("unconditional", None if base is None else base.cond_vocab_size == 0)
    if unconditional and (hybrid or bov):
        raise LoadError(f"{path}: flags unconditional with hybrid/starts_with_bov are inconsistent "
                        "(the published code forbids them together)")
    # Special ids before the condition: none, one bov, or bov + L-1 middle-bos fillers (hybrid).
    n_spe = 0 if unconditional else (L if hybrid else 1)
    cond_vocab = _cond_vocab(f, facts, codebook, n_spe, unconditional)
    if "sequence_length" in f.f and "resolution" in f.f:
        res = f.as_int("resolution", minimum=1)
        try:
            latent = _MAGVIT2.latent_shape(f.as_int("sequence_length", minimum=1), res, res)
        except ValueError as e:
            raise LoadError(f"{path}: flags sequence_length/resolution do not fit the tokenizer ({e})") from e
    elif base is not None:
        latent = base.latent_shape
    else:
        latent = f.need("sequence_length" if "sequence_length" not in f.f else "resolution")
    try:
        return TransformerConfig(
            vocab_size=codebook + cond_vocab + n_spe, n_layer=f.as_int("n_layer", facts["n_layer"]),
            n_head=f.as_int("n_head", None if base is None else base.n_head),
            n_embd=f.as_int("n_embd", facts.get("n_embd")),
            max_seq_len=f.as_int("block_size", facts["max_seq_len"]), latent_shape=latent,
            block_shape=(1, 1, L), hybrid=hybrid, bov=bov, cond_len=f.as_int("cond_token_num"),
            cond_vocab_size=cond_vocab, codebook_size=codebook, dropout=f["transformer_dropout"])
    except ConfigError as e:
        raise LoadError(f"{path}: the training flags give an invalid configuration ({e})") from e


def _check_facts(cfg: TransformerConfig, facts: dict, source: str, path: str) -> None:
    where = {"n_layer": "blocks.{i}", "n_embd": "tok_emb.weight columns",
             "vocab_size": "tok_emb.weight rows", "max_seq_len": "pos_emb rows",
             "cond_len": "uncond_embedding rows"}
    bad = [f"{name}: {getattr(cfg, name)} per {source}, but the weights have {facts[name]} ({w})"
           for name, w in where.items() if name in facts and facts[name] != getattr(cfg, name)]
    if bad:
        raise LoadError(f"{path}: the configuration disagrees with the weights:\n  " + "\n  ".join(bad))


def _check_preset(cfg: TransformerConfig, preset: str, path: str, source: str) -> None:
    base = TRANSFORMER_PRESETS[preset]
    names = [fl.name for fl in dataclasses.fields(TransformerConfig) if fl.name != "dropout"]
    bad = [f"{n}: {getattr(cfg, n)!r} per {source}, but preset {preset!r} has {getattr(base, n)!r}"
           for n in names if getattr(cfg, n) != getattr(base, n)]
    if bad:
        raise LoadError(f"{path}: does not match preset {preset!r}:\n  " + "\n  ".join(bad))


def transformer_config_from_published(tensors: dict[str, torch.Tensor], flags: dict | None,
                                      preset: str | None = None, path: str = "checkpoint") -> TransformerConfig:
    """The TransformerConfig of published generator weights.

    ``tensors``: the ``transformer.*`` state dict without the prefix.
    ``flags``: the training Namespace as a dict, or None when the file has
    none (then ``preset`` is required). Layer count, width, vocabulary and
    position-table sizes are read from the tensors where flags are missing;
    the head count, latent grid and conditioning cannot be, and come from
    ``preset``. Whatever the source, the result must agree with the tensors
    (and with ``preset`` when both are given), else LoadError.
    """
    if preset is not None and preset not in TRANSFORMER_PRESETS:
        raise LoadError(f"preset: unknown preset {preset!r}; expected one of {sorted(TRANSFORMER_PRESETS)}")
    facts = _shape_facts(tensors)
    base = TRANSFORMER_PRESETS[preset] if preset is not None else None
    if flags is None:
        if base is None:
            raise LoadError(f"{path}: has no hyper_parameters['args'] (training flags), and the head count "
                            "and token layout cannot be read from the weights; pass preset= (one of "
                            f"{sorted(TRANSFORMER_PRESETS)})")
        cfg, source = dataclasses.replace(base), f"preset {preset!r}"
    else:
        cfg, source = _config_from_flags(flags, facts, base, path), "the training flags"
        if preset is not None:
            _check_preset(cfg, preset, path, source)
    _check_facts(cfg, facts, source, path)
    return cfg


def load_transformer(path, preset: str | None = None, device=None, dtype=None, *,
                     trust_remote_code: bool = False) -> NBPTransformer:
    """Load a generator: a published Lightning ``.ckpt`` or a native directory.

    ``preset`` names a TransformerConfig preset for files without training
    flags (and, when given, must agree with the file). ``device``/``dtype``
    default to the CPU and the file's dtype. Returns the model in eval mode.
    Raises LoadError for anything that does not match. A ``.ckpt``'s training
    flags (a dict, None without any) are kept as ``model.training_flags``
    (``training_fps`` reads them). ``trust_remote_code``:
    read a ``.ckpt`` that pickles objects beyond the allow-list
    (:data:`SAFE_GLOBALS`) with a full unpickle, which runs code from the file.
    """
    path = Path(path)
    if preset is not None and preset not in TRANSFORMER_PRESETS:
        raise LoadError(f"preset: unknown preset {preset!r}; expected one of {sorted(TRANSFORMER_PRESETS)}")
    if not path.exists():
        raise LoadError(f"path: {str(path)!r} does not exist")
    if path.is_dir():
        model = NBPTransformer.from_pretrained(path, device=device, dtype=dtype)
        if preset is not None:
            _check_preset(model.config, preset, str(path), CONFIG_FILE)
        return model
    tensors, flags = _split_lightning(read_torch_file(path, trust_remote_code=trust_remote_code), path)
    cfg = transformer_config_from_published(tensors, flags, preset, str(path))
    model = build_checked(NBPTransformer, cfg, tensors, f"{path} (transformer.*)", device, dtype)
    model.training_flags = flags
    return model


def training_fps(model) -> float | None:
    """The frame rate a published generator was trained at (its flags' ``fps``), or None:
    a native model, or a file whose flags name no positive rate (the published loader
    then kept each video's own rate)."""
    fps = (getattr(model, "training_flags", None) or {}).get("fps")
    ok = isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps < math.inf
    return float(fps) if ok else None
