"""Checkpoint loading and saving: the published files and native directories.

Published files (OFFICIAL_NBP.md):

* generator ``.ckpt``: a PyTorch Lightning checkpoint; ``ckpt["state_dict"]``
  holds the generator under ``transformer.`` (the tokenizer may sit beside it
  under ``first_stage_model.``: ignored) and ``ckpt["hyper_parameters"]["args"]``
  the training flags (an ``argparse.Namespace``). Files converted from
  DeepSpeed may lack the flags: pass ``preset=``. Keys may carry ``module.``.
* tokenizer ``.pt``: ``{"model_state_dict": {"module." + name: tensor}, ...}``.

Native directories hold ``config.json`` (the config plus a ``model_type``
tag) and ``model.safetensors``; both are written atomically.

Every file is checked before a model is built from it: unknown, missing or
misshapen tensors and flags that disagree with the tensors raise
:class:`LoadError` naming what was found and what was expected.

Unpickling: files are read with ``torch.load(weights_only=True)``; a Lightning
checkpoint's ``argparse.Namespace`` is allowed explicitly. Lightning files can
also pickle arbitrary objects (callback and optimizer states); when such an
object blocks the safe loader, ``load_transformer`` falls back to a full
unpickle (``weights_only=False``, which can run code from the file) with a
warning, unless ``allow_pickle=False``. Tokenizer files never need it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from .config import TRANSFORMER_PRESETS, ConfigError, TransformerConfig
from .io import atomic_path, atomic_write_text
from .model import NBPTransformer
from .tokenizer import TokenizerConfig, VideoTokenizer

__all__ = [
    "LoadError", "load_transformer", "load_tokenizer", "save_transformer", "save_tokenizer",
    "transformer_from_pretrained", "tokenizer_from_pretrained", "transformer_config_from_published",
    "CONFIG_FILE", "WEIGHTS_FILE",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_TRANSFORMER_TYPE = "nbp-transformer"
_TOKENIZER_TYPE = "nbp-tokenizer"
_WRAPPER_PREFIXES = ("module.", "_forward_module.")  # DDP / DeepSpeed / Lightning wrappers
_LIST_LIMIT = 8


class LoadError(ValueError):
    """A checkpoint is unreadable, or does not match the model it claims to hold."""


# --- reading files -------------------------------------------------------------

def _torch_file(path: Path, *, allow_pickle: bool):
    """torch.load a file on the CPU: safe unpickling first (see the module docstring)."""
    is_zip = zipfile.is_zipfile(path)

    def load(weights_only: bool):
        # Memory-map zip checkpoints so that a multi-GB file is not copied into RAM twice.
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=is_zip)

    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return load(True)
        torch.serialization.add_safe_globals([argparse.Namespace])
        return load(True)
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        if not (is_zip and allow_pickle):
            raise LoadError(f"{path}: cannot be read with torch.load(weights_only=True) ({reason})") from e
        warnings.warn(f"{path}: holds pickled objects beyond tensors and argparse.Namespace ({reason}); "
                      "loading it with torch.load(weights_only=False), which runs code from the file: "
                      "load only checkpoints you trust (allow_pickle=False refuses)", stacklevel=3)
        return load(False)
    except (RuntimeError, KeyError, EOFError, OSError) as e:
        raise LoadError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e


def _unpickling_reason(e: Exception) -> str:
    """The informative line of torch's weights-only error (it names the blocked global)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "Unsupported global" in ln or "WeightsUnpickler" in ln]
    return (hits or lines or [type(e).__name__])[0][:300]


def _listing(items, limit: int = _LIST_LIMIT) -> str:
    items = list(items)
    head = ", ".join(str(x) for x in items[:limit])
    return head + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p):], True
    return key


def _normalize_keys(state: dict, where: str) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.``); every entry must be a named tensor."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise LoadError(f"{where}: expected a state dict of named tensors, found entry {k!r} "
                            f"of type {type(v).__name__}")
        name = _strip_wrappers(k)
        if name in out:
            raise LoadError(f"{where}: two entries map to {name!r} once 'module.' prefixes are removed")
        out[name] = v
    return out


def _check_tensors(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], what: str) -> None:
    """Raise LoadError unless ``found`` has exactly the expected names and shapes (float tensors)."""
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    wrong = [f"{k}: found {tuple(found[k].shape)}, expected {tuple(expected[k])}"
             for k in expected if k in found and found[k].shape != expected[k]]
    not_float = [f"{k} ({v.dtype})" for k, v in found.items() if not v.dtype.is_floating_point]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unknown:
        problems.append(f"unknown tensors: {_listing(unknown)}")
    if wrong:
        problems.append(f"wrong shapes: {_listing(wrong)}")
    if not_float:
        problems.append(f"non-float tensors: {_listing(not_float)}")
    if problems:
        raise LoadError(f"{what} does not match the expected architecture ({len(expected)} tensors):\n  "
                        + "\n  ".join(problems))


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _build(cls, config, tensors: dict[str, torch.Tensor], what: str, device=None, dtype=None):
    """Construct ``cls(config)`` without initialising weights and fill it from ``tensors``.

    The names and shapes are checked first; ``tensors`` is emptied.
    """
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_tensors(expected, tensors, what)
    dtype = dtype or _float_dtype(tensors)
    device = torch.device(device) if device is not None else torch.device("cpu")
    # Copy out of the (possibly memory-mapped) file so the model never aliases
    # it, consuming the dict so that at most one extra tensor is alive at a time.
    owned = {}
    for k in list(tensors):
        owned[k] = tensors.pop(k).to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(owned, strict=True, assign=True)
    return model.eval()


# --- native directories ----------------------------------------------------------

def _save_native(module: torch.nn.Module, config: dict, model_type: str, path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: expected a directory to save into, {str(path)!r} is a file")
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "model_type": model_type})
    atomic_write_text(path / CONFIG_FILE, json.dumps({"model_type": model_type, **config}, indent=2) + "\n")
    return path


def _read_native(path: Path, model_type: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise LoadError(f"{path}: expected a native checkpoint directory with {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE}, found {_listing(sorted(p.name for p in path.iterdir())) or 'nothing'}")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfg_file}: not valid JSON ({e})") from e
    found_type = config.pop("model_type", model_type)
    if found_type != model_type:
        raise LoadError(f"{path}: holds a {found_type!r} checkpoint, expected a {model_type!r} one")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LoadError(f"{weights}: not a readable safetensors file ({e})") from e
    return config, tensors


def save_transformer(model: NBPTransformer, path) -> Path:
    """Write ``model`` as a native directory: config.json + model.safetensors."""
    return _save_native(model, model.config.to_dict(), _TRANSFORMER_TYPE, path)


def save_tokenizer(tokenizer: VideoTokenizer, path) -> Path:
    """Write ``tokenizer`` as a native directory: config.json + model.safetensors."""
    return _save_native(tokenizer, tokenizer.config.to_dict(), _TOKENIZER_TYPE, path)


def _from_native(module_cls, config_cls, kind: str, path, device, dtype):
    path = Path(path)
    config, tensors = _read_native(path, kind)
    try:
        cfg = config_cls.from_dict(config)
    except (ConfigError, TypeError) as e:
        raise LoadError(f"{path / CONFIG_FILE}: invalid {config_cls.preset_kind} config ({e})") from e
    return _build(module_cls, cfg, tensors, f"{path}", device, dtype)


def transformer_from_pretrained(path, device=None, dtype=None) -> NBPTransformer:
    """Load a directory written by :func:`save_transformer` (eval mode)."""
    return _from_native(NBPTransformer, TransformerConfig, _TRANSFORMER_TYPE, path, device, dtype)


def tokenizer_from_pretrained(path, device=None, dtype=None) -> VideoTokenizer:
    """Load a directory written by :func:`save_tokenizer` (eval mode)."""
    return _from_native(VideoTokenizer, TokenizerConfig, _TOKENIZER_TYPE, path, device, dtype)


# --- the published tokenizer -----------------------------------------------------

def _tokenizer_state(raw, path: Path) -> dict[str, torch.Tensor]:
    """The tokenizer tensors of a published .pt, a plain state dict, or a Lightning .ckpt."""
    if isinstance(raw, dict) and isinstance(raw.get("model_state_dict"), dict):
        return _normalize_keys(raw["model_state_dict"], f"{path} model_state_dict")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        # A generator checkpoint that carries its tokenizer as first_stage_model.*.
        state = _normalize_keys(raw["state_dict"], f"{path} state_dict")
        prefix = "first_stage_model."
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not tensors:
            raise LoadError(f"{path}: a Lightning checkpoint without tokenizer weights (no keys under "
                            f"'{prefix}'); found {_listing(sorted(state))}")
        return tensors
    if isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return _normalize_keys(raw, f"{path}")
    keys = _listing(raw) if isinstance(raw, dict) else type(raw).__name__
    raise LoadError(f"{path}: expected a tokenizer file with 'model_state_dict' (the published "
                    f"magvit2 layout), a Lightning checkpoint or a plain state dict, found {keys}")


def load_tokenizer(path, config: TokenizerConfig | str = "magvit2", device=None, dtype=None, *,
                   allow_pickle: bool = False) -> VideoTokenizer:
    """Load a tokenizer: a published ``magvit2_*.pt`` file, a native directory,
    or the ``first_stage_model.*`` weights inside a generator ``.ckpt``.

    The published file stores no usable config (only a pickled constructor
    call, which is never unpickled here), so its architecture comes from
    ``config`` (a :class:`TokenizerConfig` or preset name; default the
    released "magvit2"); every tensor name and shape is checked against it.
    ``allow_pickle`` as in :func:`load_transformer` (the .pt files never need it).
    Returns the tokenizer in eval mode on ``device`` (default CPU).
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"path: {str(path)!r} does not exist")
    if path.is_dir():
        return tokenizer_from_pretrained(path, device=device, dtype=dtype)
    if isinstance(config, str):
        config = TokenizerConfig.from_preset(config)
    tensors = _tokenizer_state(_torch_file(path, allow_pickle=allow_pickle), path)
    return _build(VideoTokenizer, config, tensors, f"{path} (tokenizer)", device, dtype)


# --- the published generator ------------------------------------------------------

def _split_lightning(raw, path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(transformer tensors without the ``transformer.`` prefix, training flags or None)."""
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        state, hp = raw["state_dict"], raw.get("hyper_parameters")
    elif isinstance(raw, dict) and raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state, hp = raw, None
    else:
        keys = _listing(raw) if isinstance(raw, dict) else type(raw).__name__
        raise LoadError(f"{path}: expected a Lightning checkpoint with 'state_dict', found {keys}")
    state = _normalize_keys(state, f"{path} state_dict")
    tensors = {k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")}
    if not tensors and "tok_emb.weight" in state:
        tensors = dict(state)  # a bare generator state dict
    if not tensors:
        raise LoadError(f"{path}: no generator weights; expected keys under 'transformer.' "
                        f"(e.g. transformer.tok_emb.weight), found {_listing(sorted(state))}")
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
        return int(f.need("class_cond_dim"))
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
    L, hybrid, bov = int(f["token_number_per_step"]), bool(f["hybrid"]), bool(f["starts_with_bov"])
    unconditional = bool(f.need("unconditional", None if base is None else base.cond_vocab_size == 0))
    if unconditional and (hybrid or bov):
        raise LoadError(f"{path}: flags unconditional with hybrid/starts_with_bov are inconsistent "
                        "(the published code forbids them together)")
    # Special ids before the condition: none, one bov, or bov + L-1 middle-bos fillers (hybrid).
    n_spe = 0 if unconditional else (L if hybrid else 1)
    cond_vocab = _cond_vocab(f, facts, codebook, n_spe, unconditional)
    if "sequence_length" in f.f and "resolution" in f.f:
        res = int(f["resolution"])
        try:
            latent = _MAGVIT2.latent_shape(int(f["sequence_length"]), res, res)
        except ValueError as e:
            raise LoadError(f"{path}: flags sequence_length/resolution do not fit the tokenizer ({e})") from e
    elif base is not None:
        latent = base.latent_shape
    else:
        latent = f.need("sequence_length" if "sequence_length" not in f.f else "resolution")
    try:
        return TransformerConfig(
            vocab_size=codebook + cond_vocab + n_spe, n_layer=int(f.need("n_layer", facts["n_layer"])),
            n_head=int(f.need("n_head", None if base is None else base.n_head)),
            n_embd=int(f.need("n_embd", facts.get("n_embd"))),
            max_seq_len=int(f.need("block_size", facts["max_seq_len"])), latent_shape=latent,
            block_shape=(1, 1, L), hybrid=hybrid, bov=bov, cond_len=int(f["cond_token_num"]),
            cond_vocab_size=cond_vocab, codebook_size=codebook, dropout=float(f["transformer_dropout"]))
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
                     allow_pickle: bool = True) -> NBPTransformer:
    """Load a generator: a published Lightning ``.ckpt`` or a native directory.

    ``preset`` names a TransformerConfig preset for files without training
    flags (and, when given, must agree with the file). ``device``/``dtype``
    default to the CPU and the file's dtype. Returns the model in eval mode.
    Raises LoadError for anything that does not match.
    """
    path = Path(path)
    if preset is not None and preset not in TRANSFORMER_PRESETS:
        raise LoadError(f"preset: unknown preset {preset!r}; expected one of {sorted(TRANSFORMER_PRESETS)}")
    if not path.exists():
        raise LoadError(f"path: {str(path)!r} does not exist")
    if path.is_dir():
        model = transformer_from_pretrained(path, device=device, dtype=dtype)
        if preset is not None:
            _check_preset(model.config, preset, str(path), CONFIG_FILE)
        return model
    tensors, flags = _split_lightning(_torch_file(path, allow_pickle=allow_pickle), path)
    cfg = transformer_config_from_published(tensors, flags, preset, str(path))
    return _build(NBPTransformer, cfg, tensors, f"{path} (transformer.*)", device, dtype)
