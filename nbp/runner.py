"""Prefill and decode steps of ``FastGenerator`` against a static KV cache.

``ModelRunner`` drives the model's pieces (``embed``, ``run_layers``,
``logits``) with the attention implementations of one request (``Kernels``,
resolved once through ``nbp_kernels.registry``) that write the cache in place.
``DecodeStep`` owns the static buffers of one step shape (rows x tokens fed)
and either runs the step eagerly or replays it from a CUDA graph captured
once: the graph reads token ids, positions (from
``cache.seq_lens``), the guidance weight and the sampling noise from device
buffers, so nothing in a step needs the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nbp_kernels import decode_attention_cpu, decode_step_cpu, int8_linear
from nbp_kernels.cpu_ops import PackedLinears
from nbp_kernels.cpu_build import cpu_isa
from nbp_kernels.registry import resolve
from nbp_kernels.torch_ops import last_rows_attention

from .cache import StaticKVCache
from .model import LinearFn, NBPTransformer, call_module, fusable
from .sampler import BatchedSampler

__all__ = ["Kernels", "ModelRunner", "DecodeStep", "PackedLinears", "ProgramLane"]


@dataclass(frozen=True)
class Kernels:
    """The attention implementations of one request, resolved once (not per layer per call).

    causal: ``block_causal_attention`` (prefill); append: ``kv_append_``
    (prefill); decode: ``block_decode_attention`` per query count n of a
    decode step. The functions do not validate: ``ModelRunner`` builds their
    arguments from a cache it owns.
    """
    causal: Callable
    append: Callable
    decode: dict[int, Callable]

    @classmethod
    def resolve(cls, backend: str, *, device: torch.device, dtype: torch.dtype, head_dim: int,
                block_size: int, step_lens) -> "Kernels":
        """backend: a registry backend or "auto"; block_size: the mask's block; step_lens:
        the query counts of the decode steps (an op a backend lacks falls back per op)."""
        kw = dict(device=device, dtype=dtype, head_dim=head_dim)
        return cls(resolve("block_causal_attention", backend, block_size=block_size, **kw),
                   resolve("kv_append_", backend, **kw),
                   {n: resolve("block_decode_attention", backend, block_size=n, **kw)
                    for n in sorted(set(step_lens))})


class ModelRunner:
    """Prefill and decode logits of ``model`` with ``cache`` (rows = cache.batch).

    kernels: the request's attention implementations; block_size / hybrid /
    cond_len: the NBP mask of the request (StepPlan); length: the cache
    positions the request can reach (attention reads only these); linear: how
    the model's linears are computed (the registry's ``linear`` op); programs:
    run each CPU decode step as one C call (``cpu_program``) where the kernels
    compute every piece of it (the logits are then the program's buffer,
    overwritten by the next step of that shape).
    """

    def __init__(self, model: NBPTransformer, cache: StaticKVCache, *, kernels: Kernels,
                 block_size: int, hybrid: bool, cond_len: int, length: int,
                 linear: LinearFn = call_module, programs: bool = True):
        self.model, self.cache, self.kernels = model, cache, kernels
        self.block_size, self.hybrid, self.cond_len = block_size, hybrid, cond_len
        self.length, self.linear = length, linear
        self.programs = programs
        self._programs: dict[tuple, decode_step_cpu.DecodeProgram | None] = {}

    def prefill(self, ids: torch.Tensor, prefix_embeddings: torch.Tensor | None,
                n_logits: int) -> torch.Tensor:
        """Run the given tokens once and fill the cache.

        ids: int64 [rows, S]; prefix_embeddings: [rows, cond_len, C] or None.
        Returns logits [rows, n_logits, V] of the last ``n_logits`` positions
        only: neither the head nor the last layer's attention and MLP are computed
        for the others (``run_layers(keep=)``; a sixth of a 6-layer prefill).
        """
        seq_lens = self.cache.seq_lens
        append, causal = self.kernels.append, self.kernels.causal
        mask = dict(block_size=self.block_size, cond_len=self.cond_len, hybrid=self.hybrid,
                    scale=None)

        def attend(q, k, v, i):
            kc, vc = self.cache.layer(i, self.length)
            append(kc, vc, k, v, seq_lens)
            if q.shape[2] < k.shape[2]:   # the last layer's few kept queries: torch SDPA
                return last_rows_attention(q, k, v, **mask)
            return causal(q, k, v, **mask)

        x = self.model.embed(ids, prefix_embeddings=prefix_embeddings)
        x = self.model.run_layers(x, attend, self.linear, keep=n_logits)
        seq_lens.add_(ids.shape[1])
        return self.model.logits(x[:, -n_logits:], self.linear)

    def decode(self, ids: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """One block: ids int64 [rows, n] at positions seq_lens + 0..n-1 -> logits [rows, n, V].

        Every layer appends its keys/values at ``seq_lens`` and attends to all
        cached positions ``< seq_lens + n`` (bidirectional inside the block);
        then ``seq_lens += n`` on the device. length: cache positions attention
        reads (default the request's; eager callers pass exactly seq_lens + n,
        known on the host from the step plan, so early steps read less).
        """
        length = self.length if length is None else length
        seq_lens = self.cache.seq_lens
        n = ids.shape[1]
        program = self.step_program(ids)
        if program is not None:
            logits = program(ids.contiguous(), seq_lens, length)
            seq_lens.add_(n)
            return logits
        positions = seq_lens.long()[:, None] + torch.arange(n, device=ids.device)
        decode = self.kernels.decode[n]

        def attend(q, k, v, i):
            kc, vc = self.cache.layer(i, length)
            return decode(q, kc, vc, seq_lens, k_new=k, v_new=v, scale=None)

        x = self.model.run_layers(self.model.embed(ids, positions), attend, self.linear)
        seq_lens.add_(n)
        return self.model.logits(x, self.linear)

    def step_program(self, ids: torch.Tensor) -> decode_step_cpu.DecodeProgram | None:
        """The ``DecodeProgram`` that runs a decode step of ids' shape, or None (``programs``
        off, or a step the C kernels do not run whole: ``_program``)."""
        return self._program(ids) if self.programs else None

    def _program(self, ids: torch.Tensor) -> decode_step_cpu.DecodeProgram | None:
        """The C-driven step (``DecodeProgram``) of ids' shape, built once per ISA and shape,
        where the CPU kernels compute every piece of it; else None (the Python-driven step)."""
        if torch.compiler.is_compiling() or ids.device.type != "cpu":
            return None
        key = (cpu_isa()[0], *ids.shape)
        if key not in self._programs:
            self._programs[key] = cpu_program(self.model, self.linear, self.cache,
                                              self.kernels.decode.get(ids.shape[1]), ids.shape[1])
        return self._programs[key]


def cpu_program(model: NBPTransformer, linear: LinearFn, cache: StaticKVCache, attention,
                n: int) -> decode_step_cpu.DecodeProgram | None:
    """A ``DecodeProgram`` of n tokens per row for ``cache.batch`` rows, or None unless the
    linears are ``PackedLinears``, ``attention`` is the ``cpu`` backend's decode attention,
    the cache is float32, every norm / activation / dropout is one the kernels compute
    (``model.fusable``), and the libraries compile for the ISA in force."""
    if not isinstance(linear, PackedLinears) or attention is not \
            decode_attention_cpu.block_decode_attention or cache.dtype != torch.float32:
        return None
    blocks = list(model.blocks)
    if not fusable(model.ln_f, None, model.drop) or not all(
            fusable(b.ln1, None, b.attn.resid_drop) and fusable(b.ln2, b.mlp[1], b.mlp[3])
            for b in blocks):
        return None
    if not decode_step_cpu.is_available(linear.act_dtype in int8_linear.ACT_DTYPES)[0]:
        return None
    layers = [decode_step_cpu.LayerParts(
        qkv=linear.stacked(b.attn.qkv), proj=linear.packed[b.attn.proj],
        fc1=linear.packed[b.mlp[0]], fc2=linear.packed[b.mlp[2]],
        ln1=linear.norm_args(b.ln1), ln2=linear.norm_args(b.ln2)) for b in blocks]
    return decode_step_cpu.DecodeProgram(
        tok_emb=model.tok_emb.weight.detach(), pos_emb=model.pos_emb.detach()[0],
        layers=layers, ln_f=linear.norm_args(model.ln_f), head=linear.packed[model.head],
        k_cache=cache.k, v_cache=cache.v, block=n)


class DecodeStep:
    """Static buffers and (on CUDA) the captured graph of one decode step shape.

    ids: int64 [rows, n] (the tokens fed); noise: float64 [batch * n];
    cfg_weight: float64 0-d; tokens: int64 [batch, n] (the tokens drawn);
    invalid: bool 0-d (the sampler's flag: a row of logits it could not sample).
    ``run()`` reads ids/noise/cfg_weight and writes tokens and invalid, except
    where it sets ``valid_on_host`` (a CPU step whose C call drew every row:
    invalid is then left as it was, unread); the cache's seq_lens advance by n.
    """

    def __init__(self, runner: ModelRunner, sampler: BatchedSampler, *, batch: int, n: int,
                 cfg: bool, use_graph: bool, compiled=None):
        device, rows = runner.cache.device, runner.cache.batch
        self.runner, self.sampler, self.batch, self.n = runner, sampler, batch, n
        self.ids = torch.zeros(rows, n, dtype=torch.long, device=device)
        self.noise = torch.zeros(batch * n, dtype=torch.float64, device=device)
        self.cfg_weight = torch.zeros((), dtype=torch.float64, device=device) if cfg else None
        self.tokens = torch.zeros(batch, n, dtype=torch.long, device=device)
        self.invalid = torch.zeros((), dtype=torch.bool, device=device)
        self.compiled = compiled is not None
        self._decode = compiled if compiled is not None else runner.decode
        self.use_graph = use_graph
        self.graph = None
        self.valid_on_host = False   # the last run drew every row (its ``invalid`` unused)
        self.draw_in_program = True  # False: the sampler after the program (A/B runs)
        self._bound, self._bound_draw = None, None   # bound_draw's, and its draw

    def _eager(self, generator: torch.Generator | None = None, length: int | None = None) -> None:
        if self._drawn_in_program(length):
            return
        if length is None or self.compiled:   # a compiled step keeps one static length
            logits = self._decode(self.ids)
        else:
            logits = self._decode(self.ids, length)
        self._sample(logits, generator)

    def _drawn_in_program(self, length: int | None) -> bool:
        """The CPU step and its draw in one C call (``bound_draw``). True when the step has
        run: ``valid_on_host`` then says whether every row was drawn (else ``_sample`` has
        flagged the step)."""
        self.valid_on_host = False
        bound = self.bound_draw()
        if bound is None:
            return False
        if bound(self.runner.length if length is None else length):
            self._sample(bound.program.logits, None)
        else:
            self.valid_on_host = True
        return True

    def bound_draw(self) -> "decode_step_cpu.BoundDraw | None":
        """``DecodeProgram.bind_draw`` over this step's buffers (ids, the cache's seq_lens,
        noise, tokens), kept while the program and the sampler's draw stay, where the runner
        has a program for the step and the sampler's draw is that of the C kernels
        (``BatchedSampler.program_draw``); else None."""
        if not self.draw_in_program or self.compiled or self.ids.device.type != "cpu":
            return None
        draw = self.sampler.program_draw(self.batch * self.n,
                                         self.runner.model.config.vocab_size)
        program = self.runner.step_program(self.ids) if draw is not None else None
        if program is None:
            return None
        if self._bound is None or self._bound.program is not program or \
                self._bound_draw is not draw:
            self._bound = program.bind_draw(self.ids, self.runner.cache.seq_lens,
                                            u=self.noise, tokens=self.tokens, **draw)
            self._bound_draw = draw
        return self._bound

    def _sample(self, logits: torch.Tensor, generator: torch.Generator | None) -> None:
        noise = self.noise if self.sampler.needs_noise else None
        tokens, invalid = self.sampler(logits, self.cfg_weight, noise, generator)
        self.tokens.copy_(tokens)
        self.invalid.copy_(invalid)

    def _capture(self) -> None:
        """Warm up on a side stream, undo its cache advance, then record the step."""
        seq_lens = self.runner.cache.seq_lens
        saved = seq_lens.clone()
        stream = torch.cuda.Stream(device=seq_lens.device)
        stream.wait_stream(torch.cuda.current_stream(seq_lens.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager()
                seq_lens.copy_(saved)
        torch.cuda.current_stream(seq_lens.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._eager()
        seq_lens.copy_(saved)   # capture records without running; keep the state exact

    def run(self, generator: torch.Generator | None = None,
            length: int | None = None) -> torch.Tensor:
        """One step; returns the static ``tokens`` buffer [batch, n].

        length: cache positions to read when run eagerly (a replayed graph
        always reads the request's full length).
        """
        if not self.use_graph:
            self._eager(generator, length)
            return self.tokens
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.tokens


class ProgramLane:
    """The decode steps of a one-sequence CPU request, each one ``DecodeProgram.draw`` call
    that reads its ids from, and writes its tokens into, the request's output tensor, and
    its uniforms from the request's noise, in place: no torch op runs between two steps'
    C calls. After a step's weight stream every Python and torch call runs on cold caches
    (the first tiny op took 40-90 us on a Zen 4), and a gap longer than the OpenMP
    workers' spin puts them to sleep (``nbp/_wait_policy.py``): the general loop's copies,
    views and flag cost a K600 step ~0.1 ms more of Python on a 2-core Zen 4. ``build`` returns
    None where a step is not such a call.
    """

    def __init__(self, step: DecodeStep, bound, out: torch.Tensor, noise: torch.Tensor,
                 offsets: list[int]):
        self.step, self.bound, self.out, self.noise = step, bound, out, noise
        n = step.n
        self.views = [out[:, o:o + n] for o in offsets]   # what each step yields
        self._at = [(out.data_ptr() + (o - n) * 8, noise.data_ptr() + o * 8,
                     out.data_ptr() + o * 8) for o in offsets]

    @classmethod
    def build(cls, step: DecodeStep, plan, out: torch.Tensor,
              noise: torch.Tensor | None) -> "ProgramLane | None":
        """A lane for ``plan``'s decode steps (all of ``step``'s shape: n tokens, the first
        block n too, no fillers) over out int64 [1, new] and noise float64 [new], or None."""
        n = step.n
        if (out.shape[0] != 1 or noise is None
                or out.device.type != "cpu" or out.dtype != torch.int64
                or not out.is_contiguous() or noise.dtype != torch.float64
                or not noise.is_contiguous() or noise.numel() < out.numel()
                or plan.filler_after != -1 or any(t != n for t in plan.tokens)
                or sum(plan.tokens) != out.numel()):
            return None
        bound = step.bound_draw()
        return None if bound is None else cls(step, bound, out, noise,
                                              [n * s for s in range(len(plan.tokens))])

    def run(self, s: int, length: int) -> torch.Tensor:
        """Step s (>= 1) at ``length`` cached positions; returns its tokens (a view of out).
        A row without a distribution is drawn by the sampler, which flags the step
        (``step.valid_on_host`` False, ``step.invalid`` set)."""
        step = self.step
        step.valid_on_host = not self.bound.at(length, *self._at[s])
        if not step.valid_on_host:
            lo = s * step.n
            tokens, invalid = step.sampler(self.bound.program.logits, None,
                                           self.noise[lo:lo + step.n])
            self.views[s].copy_(tokens)
            step.invalid.copy_(invalid)
        return self.views[s]
