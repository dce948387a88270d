"""``keep_threshold`` and ``draw_kept`` in numpy/torch: the sampler's filter and draw anywhere.

The same two ops, with the same signatures, as ``sample_cpu`` (the two modules
are interchangeable implementations; semantics ``reference.keep_threshold`` and
``reference.draw_kept``, equal up to the rounding of float64 sums). This one
runs on every device: CUDA (torch ops only, no host synchronisation, so a
decode step that calls it can be captured in a CUDA graph) and CPUs the C
kernels do not serve (numpy's introselect picks the top-k there).

It never raises on the values of the logits and never returns an id outside
``[0, V)``. A row that holds NaN or +inf, or no finite value, gets a
non-finite ``row_max`` from ``keep_threshold`` (the caller tests
``~torch.isfinite(row_max)`` to reject it, on the device) and some id in
``[0, V)`` from ``draw_kept``.
"""
from __future__ import annotations

import numpy as np
import torch

from . import sample_cpu

__all__ = ["keep_threshold", "draw_kept", "work_shape"]

_CHUNK = 256   # inverse-CDF chunk: float64 sums over chunks, then within one chunk


def work_shape(rows: int, vocab: int) -> tuple[int, int]:
    """Shape of ``keep_threshold``'s float32 scratch for ``rows`` x ``vocab`` logits:
    ``sample_cpu.work_shape``'s (this module uses its first ``vocab`` floats per row), so
    one scratch serves both."""
    return sample_cpu.work_shape(rows, vocab)


def _check_logits(logits) -> tuple[int, int]:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 1 \
            or logits.dtype != torch.float32:
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) \
            else type(logits).__name__
        raise ValueError(f"logits: expected a float32 tensor [N, V] with V >= 1, got {got}")
    return logits.shape


def _check_column(name: str, t, logits: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != logits.device \
            or tuple(t.shape) != shape:
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) \
            else type(t).__name__
        raise ValueError(f"{name}: expected {dtype} {shape} on {logits.device}, got {got}")


def _check_work(work, N: int, V: int) -> None:
    if work is not None and (not isinstance(work, torch.Tensor) or work.dtype != torch.float32
                             or work.device.type != "cpu" or not work.is_contiguous()
                             or tuple(work.shape) != work_shape(N, V)):
        raise ValueError(f"work: expected a contiguous float32 CPU tensor {work_shape(N, V)}")


def _np_sorted_top(x: np.ndarray, k: int, values: np.ndarray, work: np.ndarray) -> np.ndarray:
    """numpy's introselect + a sort of the k kept values (faster than torch.topk on CPU).

    x: float32 [n, V]; values: float32 [n, k], written with each row's k largest,
    descending (NaN counts as the largest); work: float32 [n, V] scratch,
    overwritten. Returns how many further tokens tie with the k-th, int64 [n].
    """
    n, V = x.shape
    extra = np.zeros(n, dtype=np.int64)
    np.copyto(work, x)
    top = work
    if k < V:
        work.partition(V - k, axis=-1)
        top, rest = work[:, V - k:], work[:, :V - k]
        kth = top.min(axis=-1, keepdims=True)
        if (rest.max(axis=-1, keepdims=True) == kth).any():   # exact ties: rare, count them
            extra = np.count_nonzero(rest == kth, axis=-1).astype(np.int64)
    top.sort(axis=-1)
    np.copyto(values, top[:, ::-1])
    return extra


def _sorted_top(logits: torch.Tensor, k: int,
                work: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row, descending, and how many further tokens
    tie with the k-th one: (values float32 [N, k], extra int64 [N, 1]).

    On CPU the values are a view of ``work`` (float32 ``work_shape(N, V)``).
    """
    N, V = logits.shape
    if logits.device.type == "cpu":
        if work is None:
            work = torch.empty(work_shape(N, V), dtype=torch.float32)
        w = work.numpy()
        values = w[:, V:V + k]
        extra = _np_sorted_top(logits.detach().contiguous().numpy(), k, values, w[:, :V])
        return torch.from_numpy(values), torch.from_numpy(extra)[:, None]
    values = torch.topk(logits, k, dim=-1, sorted=True).values
    extra = (logits >= values[:, -1:]).sum(-1, keepdim=True) - k
    return values, extra


def keep_threshold(logits: torch.Tensor, top_k: int, top_p: float, *,
                   work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [N, V] -> (tau, row_max) float32 [N, 1]: keep ``logits >= tau``.

    Top-k (top_k in [1, V]) then top-p (top_p in (0, 1]) as
    ``reference.keep_threshold``. work: optional float32 CPU scratch of
    ``work_shape(N, V)``, reused between calls (a fresh multi-MB array per
    decode step is paid in page faults). A row with NaN, +inf or no finite
    value gets a non-finite row_max (its tau is meaningless).
    """
    N, V = _check_logits(logits)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= V:
        raise ValueError(f"top_k: expected an int in [1, {V}], got {top_k!r}")
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    _check_work(work, N, V)
    s, extra = _sorted_top(logits, top_k, work)
    s = s.contiguous()   # a view of ``work`` on CPU: strided rows make every pass below slow
    tau, row_max = s[:, -1:], s[:, :1]
    p = torch.tensor(top_p, dtype=torch.float32).item()   # the float32 p the C kernel compares
    if p < 1.0:
        # keep sorted position i iff i == 0 or e_0 + .. + e_{i-1} <= p * z: a prefix of c
        # tokens. Counting (not a binary search) keeps c in [1, k] whatever the row holds.
        # exp in float32 (as sample_cpu's expf), sums in float64
        e = torch.exp(s - row_max).double()
        z = e.sum(-1, keepdim=True) + extra * torch.exp(tau - row_max).double()
        c = (torch.cumsum(e, dim=-1)[:, :-1] <= p * z).sum(-1, keepdim=True) + 1
        tau = s.gather(1, c - 1)
    return tau.clone(), row_max.clone()   # own storage: views would pin s


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i drawn with probability weights[i] / sum(weights), per row: int64 [N] in [0, V).

    weights: float32 [N, V] (>= 0); u: float64 [N] uniforms in [0, 1). Chunk sums
    in float64 keep every token's probability exact to float32 precision over
    large vocabularies. When u * total rounds up to the total, the last token
    with a positive weight. A row without a finite positive total gets some
    index in [0, V) (the caller rejects such rows).
    """
    N, V = weights.shape
    pad = (-V) % _CHUNK
    if pad:
        weights = torch.nn.functional.pad(weights, (0, pad))
    chunks = weights.view(N, -1, _CHUNK)
    ccum = chunks.sum(-1).double().cumsum(-1)                    # [N, n_chunks]
    total = ccum[:, -1:].contiguous()
    target = u[:, None] * total
    last = ccum.shape[1] - 1
    # the first chunk whose sum reaches the total holds the last positive weight:
    # a bound that keeps a rounded-up (or NaN) target off the zero padding
    ci = torch.minimum(torch.searchsorted(ccum, target, right=True),
                       torch.searchsorted(ccum, total)).clamp_(max=last)
    prev = torch.where(ci > 0, ccum.gather(1, (ci - 1).clamp(min=0)), torch.zeros_like(target))
    width = ccum.gather(1, ci) - prev
    frac = ((target - prev) / width).clamp_(0.0, 1.0 - 2.0 ** -53)
    inner = chunks.gather(1, ci[:, :, None].expand(-1, -1, _CHUNK))[:, 0].double().cumsum(-1)
    inner_total = inner[:, -1:].contiguous()
    j = torch.minimum(torch.searchsorted(inner, frac * inner_total, right=True),
                      torch.searchsorted(inner, inner_total)).clamp_(max=_CHUNK - 1)
    return (ci * _CHUNK + j).squeeze(-1).clamp_(0, V - 1)


def draw_kept(logits: torch.Tensor, tau: torch.Tensor, row_max: torch.Tensor,
              u: torch.Tensor, *, work: torch.Tensor | None = None) -> torch.Tensor:
    """logits float32 [N, V]; tau, row_max float32 [N, 1]; u float64 [N] -> int64 [N].

    One token per row, drawn by inverse CDF over ``logits >= tau`` with weights
    exp(logits - row_max), as ``reference.draw_kept``. Rows with a non-finite
    row_max (see ``keep_threshold``) or nothing kept get some id in [0, V).
    work: optional float32 CPU scratch of ``work_shape(N, V)`` (``keep_threshold``'s
    may be passed again: it is free once tau is out) holding the weights.
    """
    N, V = _check_logits(logits)
    _check_column("tau", tau, logits, torch.float32, (N, 1))
    _check_column("row_max", row_max, logits, torch.float32, (N, 1))
    _check_column("u", u, logits, torch.float64, (N,))
    finite = torch.isfinite(row_max)
    # NaN: nothing of a rejected row is kept
    tau = torch.where(finite, tau, float("nan"))
    m = torch.where(finite, row_max, 0.0)
    if logits.device.type != "cpu":
        return _inverse_cdf(torch.where(logits >= tau, torch.sub(logits, m).exp_(), 0.0), u)
    _check_work(work, N, V)
    if work is None:
        work = torch.empty(work_shape(N, V), dtype=torch.float32)
    flat = work.view(-1)
    w = torch.sub(logits, m, out=flat[:N * V].view(N, V)).exp_()
    keep = flat[N * V:].view(torch.uint8)[:N * V].view(torch.bool).view(N, V).numpy()
    np.greater_equal(logits.detach().numpy(), tau.numpy(), out=keep)
    # numpy's bool-times-float beats torch's masked_fill on CPU; inf * 0
    # (a rejected row's +inf) is NaN, harmless to _inverse_cdf
    with np.errstate(invalid="ignore"):
        np.multiply(w.numpy(), keep, out=w.numpy())
    return _inverse_cdf(w, u)   # inf weights (row_max below a kept logit) still give an id in [0, V)
