"""Sampling settings, guidance math and the oracle sampler.

The published semantics, for every row: logits / temperature -> CFG mix ->
top-k -> top-p -> softmax -> multinomial; greedy decoding is the argmax of the
mixed logits. Top-k then top-p is one threshold ``tau`` (the kept tokens are
``logits >= tau``): every token tied with the k-th value is kept, and top-p
keeps the smallest prefix of the sorted distribution whose mass reaches p, the
crossing token and every token tied with it included. Its one definition is
``nbp_kernels.reference.keep_threshold``.

This module holds what both generators share: ``SamplingParams`` (validated),
``guided_logits`` (temperature and CFG: the one place that mixes), and the
oracle ``filter_logits`` / ``sample_logits`` used by the reference generator.
The fast batched sampler of ``FastGenerator`` is ``nbp.sampler``.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from nbp_kernels import reference

__all__ = ["MIN_TEMPERATURE", "SamplingParams", "cfg_mix", "cfg_weight", "check_generator",
           "filter_logits", "guided_logits", "invalid_rows", "invalid_step_error",
           "sample_logits", "threshold_args"]

# logits / temperature stays finite for any |logit| < 3.4e34 (bf16/fp16 heads stay far below)
MIN_TEMPERATURE = 1e-4


def _real(name: str, value, expected: str) -> float:
    """value as a float if it is a finite real number (not a bool), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings (raises ValueError naming the argument).

    do_sample: bool; temperature: finite number >= ``MIN_TEMPERATURE``; top_k:
    None or an int >= 1; top_p: None or a number in (0, 1]; cfg_scale: None or a
    finite number >= 0; cfg_schedule: "constant" or "linear" (scale x step
    index). Numbers are stored as Python floats / ints.
    """

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    cfg_scale: float | None = None
    cfg_schedule: str = "constant"

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample: expected True or False, got {self.do_sample!r}")
        t = _real("temperature", self.temperature, f"a finite number >= {MIN_TEMPERATURE}")
        if t < MIN_TEMPERATURE:
            raise ValueError(f"temperature: expected a finite number >= {MIN_TEMPERATURE} "
                             f"(smaller ones overflow float32 logits), got {self.temperature!r}")
        object.__setattr__(self, "temperature", t)
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) \
                    or self.top_k < 1:
                raise ValueError(f"top_k: expected None or an int >= 1, got {self.top_k!r}")
            object.__setattr__(self, "top_k", int(self.top_k))
        if self.top_p is not None:
            p = _real("top_p", self.top_p, "None or a number in (0, 1]")
            if not 0.0 < p <= 1.0:
                raise ValueError(f"top_p: expected None or a number in (0, 1], got {self.top_p!r}")
            object.__setattr__(self, "top_p", p)
        if self.cfg_scale is not None:
            scale = _real("cfg_scale", self.cfg_scale, "None or a finite number >= 0")
            if scale < 0:
                raise ValueError(f"cfg_scale: expected None or a finite number >= 0, "
                                 f"got {self.cfg_scale!r}")
            object.__setattr__(self, "cfg_scale", scale)
        if not isinstance(self.cfg_schedule, str) or self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule: expected 'constant' or 'linear', got {self.cfg_schedule!r}")


def check_generator(generator, device: torch.device | None = None) -> None:
    """ValueError unless ``generator`` is None or a ``torch.Generator`` (on ``device``'s
    type, when given: ``torch.multinomial`` draws with it on that device)."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected None or a torch.Generator, got "
                         f"{type(generator).__name__}")
    if device is not None and generator.device.type != torch.device(device).type:
        raise ValueError(f"generator: expected a generator on {torch.device(device).type} "
                         f"(it draws there), got one on {generator.device}")


def cfg_weight(params: SamplingParams, step: int):
    """Guidance weight t at decode step ``step`` (0-based)."""
    return params.cfg_scale * (step if params.cfg_schedule == "linear" else 1)


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, t) -> torch.Tensor:
    """(1 + t) * cond - t * uncond, the published guidance."""
    return (1 + t) * cond - t * uncond


def guided_logits(logits: torch.Tensor, params: SamplingParams, weight=None) -> torch.Tensor:
    """Temperature, then guidance: the logits that top-k / top-p filter and greedy takes.

    logits: [rows, ..., V], any float dtype; rows = B without guidance, 2B with it
    (conditional rows first, then unconditional). weight: the step's guidance
    weight (float or float64 0-d tensor; ``cfg_weight``), None without guidance.
    Returns float32 [B, ..., V].
    """
    lg = logits.float()
    if params.temperature != 1.0:   # x / 1.0 == x exactly: skip a pass over the logits
        lg = lg / params.temperature
    if weight is None:
        return lg
    batch = lg.shape[0] // 2
    return cfg_mix(lg[:batch], lg[batch:], weight)


def invalid_rows(logits: torch.Tensor) -> torch.Tensor:
    """bool [N]: rows of logits [N, V] that hold NaN or +inf, or no finite value."""
    return ~torch.isfinite(logits.amax(dim=-1))


def invalid_step_error(step: int) -> ValueError:
    """The error for a step whose logits had a row without a distribution to sample."""
    return ValueError(f"logits: step {step} produced a row holding NaN or +inf, or no finite "
                      f"value (a diverged model, or temperature / cfg_scale overflowing float32?)")


def threshold_args(params: SamplingParams, vocab: int) -> tuple[int, float] | None:
    """(top_k, top_p) for a ``keep_threshold`` over ``vocab`` tokens (top_k clipped to
    the vocabulary, None meaning no limit), or None when nothing is filtered."""
    k = vocab if params.top_k is None else min(params.top_k, vocab)
    p = 1.0 if params.top_p is None else params.top_p
    return None if k == vocab and p >= 1.0 else (k, p)


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """float32 [N, V]: logits [N, V] with -inf on every token outside top-k, then top-p.

    The oracle's filter: ``nbp_kernels.reference.keep_threshold`` (module docstring).
    """
    logits = logits.float()
    args = threshold_args(SamplingParams(top_k=top_k, top_p=top_p), logits.shape[-1])
    if args is None:
        return logits
    tau, _ = reference.keep_threshold(logits, *args)
    return logits.masked_fill(logits < tau, float("-inf"))


def sample_logits(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The oracle sampler: one token per row. logits float [N, V] (``guided_logits``'
    output) -> int64 [N]. Raises ValueError (``invalid_rows``) for a row it cannot sample."""
    if bool(invalid_rows(logits).any()):
        raise ValueError("logits: a row holds NaN or +inf, or no finite value")
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params.top_k, params.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
