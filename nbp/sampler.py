"""The fast batched sampler of ``FastGenerator``: raw logits of a step -> its tokens.

One call takes every row of a step, logits [rows, n, V] as the model head
returns them, and does the whole of ``nbp.sampling``'s semantics: temperature
and guidance (``guided_logits``), top-k then top-p as one threshold, and the
draw. It never returns an id outside ``[0, V)``; rows it cannot sample (NaN,
+inf, no finite value) are reported as a device-side flag, so a captured CUDA
graph needs no host synchronisation to detect them (``InvalidSteps``).

The threshold and the draw are two ops of ``nbp_kernels`` with interchangeable
implementations, picked in one place (``sampling_kernels``):
``nbp_kernels.sample_cpu`` (C, float32 CPU rows on x86-64 with AVX-512) and
``nbp_kernels.sample_torch`` (numpy/torch, any device). Both compute
``nbp_kernels.reference.keep_threshold`` / ``draw_kept``. With the C kernels and
``draw="fast"`` one call does both (``sample_cpu.sample``): each row is read from
memory once, and the draw runs over its top-k survivors while they are in cache.

Two ways to draw, both exact for the filtered distribution:

* ``draw="fast"``: inverse CDF in vocabulary order with one uniform number per
  row. The uniforms are drawn *outside* the step (``noise``) so the step can be
  captured in a CUDA graph and replayed: a graph must not advance a
  ``torch.Generator`` itself.
* ``draw="multinomial"``: ``torch.multinomial`` on the filtered softmax with the
  caller's generator: the reference generator's random stream, so seeded
  output equals ``nbp.reference.generate_tokens`` token for token. It draws
  inside the step, so it is never graph-captured.
"""
from __future__ import annotations

from types import ModuleType

import torch

from nbp_kernels import registry, sample_cpu, sample_torch

from .sampling import SamplingParams, threshold_args, guided_logits, invalid_step_error

__all__ = ["BACKENDS", "DRAWS", "BatchedSampler", "InvalidSteps", "sampling_kernels"]

DRAWS = ("fast", "multinomial")
BACKENDS = ("auto", "cpu", "torch")
_KERNEL_MODULES = {"cpu": sample_cpu, "torch": sample_torch}


def sampling_kernels(backend: str, logits: torch.Tensor) -> ModuleType:
    """The module whose ``keep_threshold`` / ``draw_kept`` serve ``logits`` (float32 [N, V]).

    backend: "auto" (the registry's choice: ``sample_cpu`` where it can run
    these rows, else ``sample_torch``), "cpu" (``sample_cpu``; an error naming
    ``backend`` when it cannot) or "torch". ``nbp_kernels.registry.forced``
    steers "auto".
    """
    chosen = registry.resolved_backend("keep_threshold", backend, device=logits.device,
                                       dtype=logits.dtype)
    return _KERNEL_MODULES[chosen]


class BatchedSampler:
    """Turns the raw logits of one step into one token per (sequence, position).

    params: validated ``SamplingParams``; draw: ``"fast"`` or ``"multinomial"``
    (module docstring); backend: which kernels filter and draw
    (``sampling_kernels``).
    """

    def __init__(self, params: SamplingParams, draw: str = "fast", backend: str = "auto"):
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        if draw not in DRAWS:
            raise ValueError(f"draw: expected one of {DRAWS}, got {draw!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.params, self.draw, self.backend = params, draw, backend
        self._work: torch.Tensor | None = None
        self._resolved: dict[tuple, ModuleType] = {}   # resolved once per (device, dtype)
        self._program_draws: dict[tuple[int, int], dict | None] = {}

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

    def __call__(self, logits: torch.Tensor, cfg_weight=None, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's tokens.

        logits: [rows, n, V], any float dtype: rows = B, or 2B with guidance
        (conditional rows first); cfg_weight: the step's guidance weight (float
        or float64 0-d tensor; ``nbp.sampling.cfg_weight``), None without
        guidance; noise: float64 [B * n] (``draw="fast"``); generator: for
        ``draw="multinomial"``. Returns (tokens int64 [B, n] in [0, V), invalid:
        bool 0-d on the logits' device, True when a row held NaN or +inf or no
        finite value: its token is meaningless, the step must be rejected).
        """
        p = self.params
        if (cfg_weight is None) != (p.cfg_scale is None):
            raise ValueError("cfg_weight: expected a weight exactly when params.cfg_scale is set")
        if self.needs_noise and noise is None:
            raise ValueError("noise: draw='fast' needs uniforms from BatchedSampler.noise")
        lg = guided_logits(logits, p, cfg_weight)
        shape = lg.shape[:-1]
        x = lg.reshape(-1, lg.shape[-1])
        if not p.do_sample:
            # max's indices are argmax's (the first maximal value); its values flag bad rows
            row_max, tokens = x.max(dim=-1)
            return tokens.view(shape), ~torch.isfinite(row_max).all()
        if self.draw == "fast" and self._kernels(x) is sample_cpu:
            tokens = self._fused(x, noise)
            if tokens is not None:
                return tokens.view(shape), torch.zeros((), dtype=torch.bool)
        tau, row_max = self._threshold(x)
        bad = ~torch.isfinite(row_max)
        if self.draw == "multinomial":
            masked = x.masked_fill(x < tau, float("-inf")).masked_fill_(bad, 0.0)
            tokens = torch.multinomial(torch.softmax(masked, dim=-1), 1, generator=generator)
        else:
            kernels = self._kernels(x)
            if kernels is sample_cpu and bool(bad.any()):   # on the CPU the test is free
                kernels = sample_torch                      # which draws any row, never raising
            # sample_torch takes the threshold's scratch for its weights too
            extra = {"work": self._scratch(x, kernels)} if kernels is sample_torch else {}
            tokens = kernels.draw_kept(x, tau, row_max, noise, **extra)
        return tokens.view(shape), bad.any()

    def program_draw(self, rows: int, vocab: int) -> dict | None:
        """The arguments of ``DecodeProgram.draw`` (top_k, top_p, work) for float32 CPU logits
        [rows, vocab] when this sampler's draw is exactly ``sample_cpu.sample`` on them
        (do_sample, draw="fast", temperature 1, no guidance, the C kernels chosen); else None
        (the step's logits then come back to ``__call__``). Decided once per shape."""
        key = (rows, vocab)
        if key not in self._program_draws:
            p = self.params
            fused = p.do_sample and self.draw == "fast" and p.temperature == 1.0 and \
                p.cfg_scale is None and self._kernels(torch.empty(0, vocab)) is sample_cpu
            top_k, top_p = threshold_args(p, vocab) or (vocab, 1.0)
            self._program_draws[key] = dict(
                top_k=top_k, top_p=top_p,
                work=self._work_of(sample_cpu.work_shape(rows, vocab))) if fused else None
        return self._program_draws[key]

    def _kernels(self, x: torch.Tensor) -> ModuleType:
        key = (x.device, x.dtype)
        if key not in self._resolved:
            self._resolved[key] = sampling_kernels(self.backend, x)
        return self._resolved[key]

    def _scratch(self, x: torch.Tensor, kernels: ModuleType) -> torch.Tensor | None:
        """The kernels' CPU scratch for x [N, V], kept from one step to the next (None off
        the CPU): a fresh multi-MB array per step is paid in page faults."""
        if x.device.type != "cpu":
            return None
        return self._work_of(kernels.work_shape(*x.shape))

    def _work_of(self, shape: tuple[int, int]) -> torch.Tensor:
        if self._work is None or tuple(self._work.shape) != shape:
            self._work = torch.empty(shape, dtype=torch.float32)
        return self._work

    def _fused(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor | None:
        """int64 [N]: the C kernels' threshold and draw in one call, each row read once
        (``sample_cpu.sample``); None when a row has no distribution (the two-call path
        then flags it)."""
        args = threshold_args(self.params, x.shape[-1]) or (x.shape[-1], 1.0)
        tokens, bad = sample_cpu.sample(x, *args, noise, work=self._scratch(x, sample_cpu))
        return None if bad else tokens

    def _threshold(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tau, row_max) float32 [N, 1] of x float32 [N, V]; tau = -inf when nothing is filtered."""
        args = threshold_args(self.params, x.shape[-1])
        if args is None:
            return torch.full_like(x[:, :1], float("-inf")), x.amax(dim=-1, keepdim=True)
        kernels = self._kernels(x)
        work = self._scratch(x, kernels)
        try:
            return kernels.keep_threshold(x, *args, work=work)
        except ValueError:
            if kernels is not sample_cpu:
                raise
            # sample_cpu rejects rows without a distribution; sample_torch flags them instead
            return sample_torch.keep_threshold(x, *args, work=work)


class InvalidSteps:
    """Collects the sampler's per-step ``invalid`` flags and raises naming the first bad step.

    On the CPU a flag is read at once (free); on other devices flags stay on the
    device (no synchronisation inside the decode loop) until ``check()``.
    """

    def __init__(self, num_steps: int, device: torch.device):
        self.eager = torch.device(device).type == "cpu"
        self.flags = None if self.eager else torch.zeros(num_steps, dtype=torch.bool, device=device)

    def record(self, step: int, invalid: torch.Tensor) -> None:
        """invalid: bool 0-d, the sampler's flag for step ``step``."""
        if self.eager:
            if bool(invalid):
                raise invalid_step_error(step)
        else:
            self.flags[step].copy_(invalid)

    def check(self) -> None:
        """Raise for the first step recorded invalid (one host synchronisation)."""
        if self.flags is not None and bool(self.flags.any()):
            raise invalid_step_error(int(self.flags.nonzero()[0, 0]))
