"""Native checkpoints: a directory with ``config.json`` and ``model.safetensors``.

Generic over the module class: any ``nn.Module`` built as ``cls(config)`` from
a :class:`~nbp.config.JsonConfig` dataclass, whose class names that config
class (``config_class``) and a ``model_type`` tag written into config.json
(see :class:`nbp.pretrained.Pretrained`). Nothing here unpickles: the config
is JSON and the weights are safetensors.

Also the tensor checks shared with :mod:`nbp.published`: every load compares
the file's tensor names and shapes with the architecture the config
describes before any weight is allocated, and raises :class:`LoadError`
naming what was found and what was expected. See docs/published-checkpoints.md.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.overrides import TorchFunctionMode

from .config import ConfigError
from .io import atomic_path, atomic_write_text

__all__ = ["LoadError", "CONFIG_FILE", "WEIGHTS_FILE", "save_native", "load_native",
           "read_native_config", "build_checked", "normalize_keys", "listing"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_WRAPPER_PREFIXES = ("module.", "_forward_module.")  # DDP / DeepSpeed / Lightning wrappers
_LIST_LIMIT = 8
# Meta-building this many parameters takes milliseconds; past it a config cannot fit the file.
_BUDGET_FACTOR, _BUDGET_SLACK = 8, 1024


class LoadError(ValueError):
    """A checkpoint is unreadable, unsafe to read, or does not match the model it claims to hold."""


def listing(items, limit: int = _LIST_LIMIT) -> str:
    """``a, b, c, ... (n more)``: at most ``limit`` items of a long list, for messages."""
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


def normalize_keys(state: dict, where: str) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (``module.``, ``_forward_module.``); every entry must be a named tensor."""
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
        problems.append(f"missing tensors: {listing(missing)}")
    if unknown:
        problems.append(f"unknown tensors: {listing(unknown)}")
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong)}")
    if not_float:
        problems.append(f"non-float tensors: {listing(not_float)}")
    if problems:
        raise LoadError(f"{what} does not match the expected architecture ({len(expected)} tensors):\n  "
                        + "\n  ".join(problems))


@contextmanager
def _parameter_budget(n_tensors: int, what: str):
    """Abort module construction once it registers more than ``limit`` parameters.

    A config can describe far more layers than its file holds (``n_layer``
    1e8): building even the meta skeleton of those would take hours, so the
    build stops once it is far past the file's size (a near miss is still
    built, for the precise per-tensor comparison).
    """
    count, limit = 0, _BUDGET_FACTOR * n_tensors + _BUDGET_SLACK

    def hook(module, name, param):
        nonlocal count
        count += param is not None
        if count > limit:
            raise LoadError(f"{what}: the configuration describes far more parameters than the "
                            f"file's {n_tensors} tensors (stopped building the architecture at {count})")

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# In-place initialisers (torch.nn.init's and the Tensor methods they call).
_INITIALISERS = frozenset({"normal_", "uniform_", "zero_", "zeros_", "ones_", "fill_", "constant_",
                           "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                           "xavier_normal_", "orthogonal_"})


class _NoInitOnMeta(TorchFunctionMode):
    """Skips the initialisers of meta tensors while a skeleton is built.

    A meta tensor has no data to fill, but torch runs its initialisers through the
    reference decompositions, whose first use imports the compiler stack
    (torch._dynamo: about a second on every ``nbp`` command that loads a model).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in _INITIALISERS:
            target = args[0] if args else kwargs.get("tensor")   # torch.nn.init passes tensor=
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def _float_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    dtypes = {v.dtype for v in tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def build_checked(cls, config, tensors: dict[str, torch.Tensor], what: str, device=None, dtype=None):
    """``cls(config)`` in eval mode, filled from ``tensors`` (which is emptied).

    The architecture is built on the meta device (no memory, no init), and
    abandoned when it grows far past ``len(tensors)`` parameters; names and shapes are compared with
    ``tensors`` before anything is allocated. ``dtype`` defaults to the
    file's (float32 when it mixes dtypes), ``device`` to the CPU.
    """
    with torch.device("meta"), _NoInitOnMeta(), _parameter_budget(len(tensors), what):
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


def save_native(module: nn.Module, path) -> Path:
    """Write ``module`` (with ``.config`` and a class ``model_type``) into directory ``path``.

    ``config.json`` = ``{"model_type": ..., **config.to_dict()}``; ``model.safetensors``
    = the state dict on the CPU. Both files are written atomically. Returns ``path``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path: expected a directory to save into, {str(path)!r} is a file")
    model_type = getattr(type(module), "model_type", None)
    if not isinstance(model_type, str) or not hasattr(getattr(module, "config", None), "to_dict"):
        raise ValueError(f"module: expected a module with a class model_type tag and a JsonConfig "
                         f".config (NBPTransformer, VideoTokenizer), got {type(module).__name__}")
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    config = {"model_type": model_type, **module.config.to_dict()}
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "model_type": model_type})
    atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return path


def read_native_config(cfg_file: Path, config_cls, model_type: str):
    """Parse and validate ``config.json``: a ``config_cls`` or LoadError naming the file and field."""
    try:
        raw = json.loads(cfg_file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LoadError(f"{cfg_file}: not UTF-8 text ({e})") from e
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise LoadError(f"{cfg_file}: expected a JSON object of config fields, found "
                        f"{type(raw).__name__} {str(raw)[:60]}")
    found_type = raw.pop("model_type", model_type)
    if found_type != model_type:
        raise LoadError(f"{cfg_file.parent}: holds a {found_type!r} checkpoint, expected a {model_type!r} one")
    try:
        return config_cls.from_dict(raw)
    except ConfigError as e:
        raise LoadError(f"{cfg_file}: invalid {config_cls.preset_kind} config ({e})") from e


def load_native(cls, path, device=None, dtype=None):
    """Load a directory written by :func:`save_native` as a ``cls`` (eval mode).

    ``cls`` names its ``config_class`` and ``model_type``. The config is
    validated, then checked against the tensor names and shapes, before any
    weight is allocated. Raises LoadError.
    """
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir() or not cfg_file.is_file() or not weights.is_file():
        found = listing(sorted(p.name for p in path.iterdir())) if path.is_dir() else "no directory"
        raise LoadError(f"{path}: expected a native checkpoint directory with {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE}, found {found or 'nothing'}")
    config = read_native_config(cfg_file, cls.config_class, cls.model_type)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights), device="cpu")
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LoadError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    return build_checked(cls, config, tensors, str(path), device, dtype)
