"""The batched sampler of ``FastGenerator``: all B x L rows of a step in one call.

Same distribution as ``nbp.sampling`` (temperature and CFG are applied by the
caller; this module filters and draws), computed without sorting the whole
vocabulary:

* top-k: the k largest logits are selected (``np.partition`` on CPU,
  ``torch.topk`` elsewhere) and only those k are sorted. Every token whose
  logit equals the k-th value is kept, as in ``filter_logits``.
* top-p: the cumulative softmax mass over the sorted top-k values (normalised
  over every top-k survivor, ties included) gives the crossing token; its logit
  is the final threshold ``tau``. Tokens tied with the crossing token are all
  kept (``filter_logits`` keeps an arbitrary subset of such exact ties; with
  real-valued logits they do not occur).
* the kept set is ``logits >= tau``.

For float32 rows on the CPU, where it can be compiled, ``nbp_kernels.sample_cpu``
computes the same threshold without sorting at all (a sampled selection by
rank, then by softmax mass; ``reference.keep_threshold``) and the fast draw
below in one pass per row, rows shared over torch's OpenMP threads: 4x faster
for a 16 x 64000 step. ``CPU_KERNELS = False`` forces the numpy/torch path.

Two ways to draw, both exact for the filtered distribution:

* ``draw="fast"``: inverse CDF in vocabulary order with one uniform number per
  row (float64 chunked cumulative sums). The uniforms are drawn *outside* the
  step (``noise``) so the step can be captured in a CUDA graph and replayed:
  a graph must not advance a ``torch.Generator`` itself.
* ``draw="multinomial"``: ``torch.multinomial`` on the filtered softmax with the
  caller's generator: the reference generator's random stream, so seeded
  output equals ``nbp.reference.generate_tokens`` token for token. It draws
  inside the step, so it is never graph-captured.
"""
from __future__ import annotations

import numpy as np
import torch

from nbp_kernels import sample_cpu

from .sampling import SamplingParams

__all__ = ["BatchedSampler", "keep_threshold", "DRAWS"]

DRAWS = ("fast", "multinomial")
_CHUNK = 256   # inverse-CDF chunk: float64 sums over chunks, then within one chunk
CPU_KERNELS = True   # use nbp_kernels.sample_cpu for float32 CPU rows where it is available


def _use_cpu_kernels(x: torch.Tensor) -> bool:
    return (CPU_KERNELS and x.device.type == "cpu" and x.dtype == torch.float32
            and sample_cpu.is_available()[0])


def _np_sorted_top(x: np.ndarray, k: int, values: np.ndarray, work: np.ndarray) -> np.ndarray:
    """numpy's introselect + vectorised sort of the k kept values (faster than
    torch.topk on CPU). x: float32 [n, V]; values: float32 [n, k], written with
    each row's k largest, descending; work: float32 [n, V] scratch, overwritten.
    Returns the extra ties with the k-th, int64 [n]."""
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


class Scratch:
    """CPU arrays reused from one decode step to the next, by name.

    A fresh multi-MB array per step is paid in page faults: glibc hands large
    freed blocks back to the OS, so the next step touches new pages (measured:
    ~1970 faults per K600 NBP step, and 1.1 ms for a [16, 64000] subtraction
    whose arithmetic takes 0.24 ms). The arrays returned by one step are
    overwritten by the next.
    """

    def __init__(self):
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of this shape and dtype, the same one as last time if it fits."""
        a = self._arrays.get(name)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = self._arrays[name] = np.empty(shape, dtype=dtype)
        return a


def _array(scratch: Scratch | None, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    return np.empty(shape, dtype=dtype) if scratch is None else scratch.get(name, shape, dtype)


def _sorted_top(logits: torch.Tensor, k: int,
                scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row, descending, and how many further
    tokens tie with the k-th one.

    logits: float32 [N, V] -> (values float32 [N, k], extra_ties int64 [N, 1]).
    With ``scratch`` (CPU) the values live in its arrays until the next call.
    """
    N, V = logits.shape
    if logits.device.type == "cpu":
        x = logits.detach().contiguous().numpy()
        values = _array(scratch, "top_values", (N, k), np.float32)
        extra = _np_sorted_top(x, k, values, _array(scratch, "top_work", (N, V), np.float32))
        return torch.from_numpy(values), torch.from_numpy(extra)[:, None]
    values = torch.topk(logits, k, dim=-1, sorted=True).values
    extra = (logits >= values[:, -1:]).sum(-1, keepdim=True) - k
    return values, extra


def keep_threshold(logits: torch.Tensor, top_k: int | None,
                   top_p: float | None) -> torch.Tensor | None:
    """tau float32 [N, 1] with kept tokens ``logits >= tau``; None when nothing is filtered.

    logits: float32 [N, V], already temperature-scaled and CFG-mixed.
    """
    found = _threshold_and_max(logits, top_k, top_p)
    return None if found is None else found[0]


def _threshold_and_max(logits: torch.Tensor, top_k: int | None, top_p: float | None,
                       scratch: Scratch | None = None):
    """(tau [N, 1], row max [N, 1]) on logits' device, or None when nothing is filtered."""
    V = logits.shape[-1]
    use_k = top_k is not None and top_k < V
    use_p = top_p is not None and top_p < 1.0
    if not (use_k or use_p):
        return None
    k = top_k if use_k else V
    if _use_cpu_kernels(logits):
        shape = sample_cpu.work_shape(*logits.shape)
        work = None if scratch is None else torch.from_numpy(scratch.get("work", shape, np.float32))
        return sample_cpu.keep_threshold(logits, k, top_p if use_p else 1.0, work=work)
    s, extra = _sorted_top(logits, k, scratch)
    tau, m = s[:, -1:], s[:, :1]
    if use_p:
        e = torch.exp(s - m)
        z = e.sum(-1, keepdim=True) + extra * torch.exp(tau - m)
        cum = torch.cumsum(e / z, dim=-1)
        # keep sorted position i iff i == 0 or cum[i - 1] <= p: a prefix of length c.
        # cum never decreases, so the count of cum[:-1] <= p is a binary search
        # (p as float32, as the comparison with a Python float would take it).
        p = torch.full((cum.shape[0], 1), top_p, dtype=cum.dtype, device=cum.device)
        c = torch.searchsorted(cum, p, right=True).clamp_(max=cum.shape[1] - 1) + 1
        tau = s.gather(1, c - 1)
    return tau.to(logits.device), m.to(logits.device)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i drawn with probability weights[i] / sum(weights), per row.

    weights: float32 [N, V] (>= 0, a positive entry in every row); u: float64
    [N] uniforms in [0, 1). Returns int64 [N]. Chunk sums in float64 keep every
    token's probability exact to float32 precision over large vocabularies.
    """
    N, V = weights.shape
    pad = (-V) % _CHUNK
    if pad:
        weights = torch.nn.functional.pad(weights, (0, pad))
    chunks = weights.view(N, -1, _CHUNK)
    ccum = chunks.sum(-1).double().cumsum(-1)                    # [N, n_chunks]
    target = u[:, None] * ccum[:, -1:]
    ci = torch.searchsorted(ccum, target, right=True).clamp_(max=ccum.shape[1] - 1)
    prev = torch.where(ci > 0, ccum.gather(1, (ci - 1).clamp(min=0)), torch.zeros_like(target))
    width = ccum.gather(1, ci) - prev
    frac = ((target - prev) / width).clamp_(0.0, 1.0 - 2.0 ** -53)
    inner = chunks.gather(1, ci[:, :, None].expand(-1, -1, _CHUNK))[:, 0].double().cumsum(-1)
    j = torch.searchsorted(inner, frac * inner[:, -1:], right=True).clamp_(max=_CHUNK - 1)
    return (ci * _CHUNK + j).squeeze(-1)


def _kept_weights(logits: torch.Tensor, found, scratch: Scratch | None = None) -> torch.Tensor:
    """exp(logits - max) where ``logits >= tau``, else 0: float32 [N, V].

    found: (tau, row max) from ``_threshold_and_max``, or None (nothing filtered).
    With ``scratch`` (CPU) the result lives in its arrays until the next call.
    """
    m = logits.amax(dim=-1, keepdim=True) if found is None else found[1]
    if logits.device.type != "cpu":
        w = torch.sub(logits, m).exp_()
        return w if found is None else w.masked_fill_(logits < found[0], 0.0)
    out = torch.from_numpy(_array(scratch, "weights", tuple(logits.shape), np.float32))
    w = torch.sub(logits, m, out=out).exp_()
    if found is not None:
        # numpy's bool-times-float is ~3x faster than torch's masked_fill on CPU
        keep = np.greater_equal(logits.detach().numpy(), found[0].numpy(),
                                out=_array(scratch, "keep", tuple(logits.shape), np.bool_))
        np.multiply(w.numpy(), keep, out=w.numpy())
    return w


class BatchedSampler:
    """Filters and draws one token per row of ``logits`` [N, V] in one call.

    params: validated ``SamplingParams`` (temperature and CFG are applied by the
    caller); draw: ``"fast"`` or ``"multinomial"`` (see the module docstring).
    """

    def __init__(self, params: SamplingParams, draw: str = "fast"):
        if draw not in DRAWS:
            raise ValueError(f"draw: expected one of {DRAWS}, got {draw!r}")
        self.params = params
        self.draw = draw
        self._scratch = Scratch()

    @property
    def needs_noise(self) -> bool:
        """True when each call consumes uniforms drawn beforehand by ``noise``."""
        return self.params.do_sample and self.draw == "fast"

    @property
    def graph_safe(self) -> bool:
        """True when a call touches no random generator (capturable in a CUDA graph)."""
        return not (self.params.do_sample and self.draw == "multinomial")

    def noise(self, rows: int, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
        """Uniforms float64 [rows] in [0, 1) for ``rows`` draws, from ``generator``."""
        gen_device = generator.device if generator is not None else device
        u = torch.rand(rows, generator=generator, dtype=torch.float64, device=gen_device)
        return u.to(device, non_blocking=True)

    def __call__(self, logits: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """logits: float32 [N, V]; noise: float64 [N] (``draw="fast"``). Returns int64 [N]."""
        p = self.params
        if not p.do_sample:
            return logits.argmax(dim=-1)
        if self.draw == "fast" and noise is None:
            raise ValueError("noise: draw='fast' needs uniforms from BatchedSampler.noise")
        found = _threshold_and_max(logits, p.top_k, p.top_p, self._scratch)
        if self.draw == "multinomial":
            masked = logits if found is None else logits.masked_fill(logits < found[0], float("-inf"))
            probs = torch.softmax(masked, dim=-1)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if not _use_cpu_kernels(logits):
            return _inverse_cdf(_kept_weights(logits, found, self._scratch), noise)
        if found is None:
            found = (torch.full_like(logits[:, :1], float("-inf")),
                     logits.amax(dim=-1, keepdim=True))
        return sample_cpu.draw_kept(logits, found[0], found[1], noise)
