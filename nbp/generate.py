"""FastGenerator: static KV cache, one block per decode step, batched sampling, CUDA graphs.

Same semantics as ``nbp.reference.generate_tokens`` (the step plan and input
checks come from ``nbp.step_plan``, sampling from ``nbp.sampling`` /
``nbp.sampler``), computed the fast way:

* the given tokens are run once (prefill) and the vocabulary head is computed
  only for the positions whose logits are used;
* each later step feeds one block of L tokens at positions read from the
  cache's device-side ``seq_lens``; every layer appends its keys/values in
  place and attends through ``nbp_kernels.block_decode_attention``;
* all B x L rows of a step are filtered and drawn in one sampler call;
* classifier-free guidance runs the conditional and unconditional branches as
  one doubled batch (rows B..2B-1 carry ``model.uncond_embedding`` in place of
  the condition), mixed inside the sampler;
* on CUDA the decode step is captured once in a CUDA graph and replayed.

Random numbers: with ``do_sample`` the default ``draw="fast"`` draws one
uniform per token up front from ``generator`` (one call, before the loop) and
samples by inverse CDF, so graph replays never touch a ``torch.Generator``.
``draw="multinomial"`` uses ``torch.multinomial`` with ``generator`` inside
each step, reproducing the reference generator's random stream token for token
(on CPU); such steps are never graph-captured.
"""
from __future__ import annotations

import functools
import threading

import torch

from nbp_kernels import registry
from nbp_kernels.int8_linear import is_available as int8_linear_available
from nbp_kernels.packed_linear import checked_act_dtype

from . import devices, layout, long_video
from .cache import StaticKVCache
from .runner import DecodeStep, Kernels, ModelRunner, ProgramLane
from .model import NBPTransformer
from .sampler import DRAWS, BatchedSampler, InvalidSteps
from .sampling import SamplingParams, cfg_weight, check_generator
from .step_plan import StepPlan, check_generation_inputs, plan_steps

__all__ = ["FastGenerator", "TokenSteps"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LENGTH_QUANTUM = 64   # cache views are rounded up so nearby request lengths share graphs


def _positive_or_none(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}: expected None or a positive int, got {value!r}")


def _linear_backend(packed_linear, device: torch.device, dtype: torch.dtype) -> str:
    """The registry backend of the ``linear`` op for ``FastGenerator(packed_linear=...)``:
    "auto" lets the registry choose (``cpu``'s packed kernel where usable), True forces
    ``cpu`` (raising if unusable), False forces ``torch``."""
    if packed_linear not in ("auto", True, False):
        raise ValueError(f"packed_linear: expected 'auto', True or False, got {packed_linear!r}")
    if packed_linear is not True:
        return "auto" if packed_linear == "auto" else "torch"
    try:
        registry.resolve("linear", "cpu", device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"packed_linear: True, but the kernel is not usable: {e}") from None
    return "cpu"


_WEIGHT_DTYPES = (None, torch.float32, torch.bfloat16, torch.int8)


def _checked_weight_dtype(weight_dtype, packed_linear, device: torch.device,
                          dtype: torch.dtype):
    """``weight_dtype`` as the packed linears take it (None for float32 weights), or a
    ValueError naming it: narrower weights exist only in the ``cpu`` backend's packed
    linear, so they need a float32 generator on a CPU where that kernel runs."""
    if weight_dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype: expected None, torch.float32, torch.bfloat16 or "
                         f"torch.int8, got {weight_dtype!r}")
    if weight_dtype in (None, torch.float32):
        return None
    if packed_linear is False:
        raise ValueError(f"weight_dtype: {weight_dtype} weights run through the packed CPU "
                         f"linear, but packed_linear=False")
    try:
        registry.resolve("linear", "cpu", device=device, dtype=dtype)
    except ValueError as e:
        raise ValueError(f"weight_dtype: {weight_dtype} weights need the packed CPU linear "
                         f"(a float32 generator on the CPU where the kernel runs): {e}") from None
    return weight_dtype


def _checked_act_dtype(act_dtype, weight_dtype):
    """``act_dtype`` as the packed linears take it (None for float32 activations), or a
    ValueError naming it: integer activations need int8 weights, and the int8 kernel;
    bfloat16 ones bfloat16 weights (whose kernel ``weight_dtype`` checked)."""
    act = checked_act_dtype(act_dtype, weight_dtype)
    if act == torch.float32:
        return None
    if act == torch.bfloat16:
        return act
    ok, why = int8_linear_available()
    if not ok:
        raise ValueError(f"act_dtype: {act} activations need the int8 CPU linear: {why}")
    return act


def _serialized(method):
    """Run ``method`` holding the generator's (reentrant) lock: the static cache and the
    captured decode steps are shared by every call on one generator."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


class TokenSteps:
    """Iterator of a request's steps, (step, tokens int64 [B, n]) in the order they are drawn;
    ``out``: int64 [B, num_new_tokens], every step's tokens in place once it is exhausted."""

    def __init__(self, out: torch.Tensor, steps):
        self.out, self._steps = out, steps

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, torch.Tensor]:
        return next(self._steps)


class FastGenerator:
    """Fast generation with an ``NBPTransformer`` (and optionally a ``VideoTokenizer``).

    The model (and tokenizer) are moved to ``device`` and the model cast to
    ``dtype`` in place, then put in eval mode; the tokenizer keeps its own dtype
    (``nbp generate`` casts it to ``nbp.devices.tokenizer_dtype``: bfloat16 on CPUs
    with native bf16 matmul), and decoded videos are float32 either way. max_batch_size: largest batch a
    call may pass (None: any); max_seq_len: cache length in positions (None:
    sized by the first request and grown when a longer one comes).
    cuda_graphs: "auto" (on for CUDA), True or False. compile: wrap the decode
    forward in ``torch.compile``. draw: "fast" or "multinomial" (module docstring).
    backend: the attention backend, a ``nbp_kernels.registry`` backend or
    "auto" (an op the backend lacks falls back to ``auto`` for that op);
    resolved once per request. packed_linear: run the decode steps' linears
    through ``nbp_kernels.packed_linear`` (the registry's ``linear`` op on
    backend ``cpu``: float32 on CPU; the weights are packed once, a second
    copy of them): "auto" (when usable), True (raise if unusable) or False
    (``torch``). The sampler's ops follow ``auto``; force them with
    ``nbp_kernels.registry.forced(keep_threshold=..., draw_kept=...)``.
    weight_dtype: None (the model's float32 weights), torch.bfloat16 or
    torch.int8 (per-output-channel scales, ``nbp_kernels.reference.quantize_weight``):
    the linears and the vocabulary head run from a packed copy of their
    weights at that dtype (fewer bytes read per decode step; also the
    prefill), computing what ``reference.dequantized_linear`` does;
    activations, the KV cache and the sampler are unchanged (``most_likely_class``
    scores with the float32 model). Needs the packed CPU linear (a float32
    generator on the CPU), else ValueError. act_dtype: None (float32
    activations), torch.int16 or torch.int8, with weight_dtype=torch.int8 only:
    the same linears also round their input rows to 16-bit levels (13-15 bits,
    ``nbp_kernels.reference.act_levels``: within about 1e-4 of float32) or to int8
    at each call and multiply in int32 (``nbp_kernels.reference.int8_linear``;
    faster on CPUs with integer dot products such as AVX512-VNNI; int8 rows are
    a little less exact); or torch.bfloat16, with weight_dtype=torch.bfloat16 only:
    the rows are rounded to bfloat16 (``nbp_kernels.reference.bf16_rows``), faster
    on CPUs with AVX512-BF16 dot products (``nbp_kernels.packed_linear.bf16_path``). With the
    packed linears and the ``cpu`` decode attention, each decode step is one C
    call (``nbp_kernels.decode_step_cpu.DecodeProgram``, the same kernels bit for
    bit); set ``decode_programs = False`` before the first request to drive the
    steps from Python instead. Where the sampler's draw is the C sampler's
    (draw="fast", temperature 1, no guidance) it runs in the same call
    (``DecodeProgram.draw``); ``draw_in_program = False`` calls the sampler after
    the step instead (A/B runs).

    Threads: one generator may be shared, but its calls run one at a time (its
    public methods hold one reentrant lock, as they share the static cache and
    the captured steps; a ``callback`` runs holding it, so it may call the
    generator itself but must not wait for another thread that does). For
    concurrent requests create one generator per thread; several generators
    may share one model (same device and dtype).

    Device and memory: an unavailable ``device`` is refused before the model
    moves; a request whose KV cache cannot fit in the device's free memory is
    refused before anything is allocated (``check_batch_fits``).
    """

    def __init__(self, model: NBPTransformer, tokenizer=None, *, device=None, dtype=None,
                 backend: str = "auto", max_batch_size: int | None = None,
                 max_seq_len: int | None = None, cuda_graphs="auto", compile: bool = False,
                 draw: str = "fast", packed_linear="auto", weight_dtype=None, act_dtype=None):
        if not isinstance(model, NBPTransformer):
            raise ValueError(f"model: expected an NBPTransformer, got {type(model).__name__}")
        device = (devices.checked_device(device) if device is not None
                  else next(model.parameters()).device)
        dtype = dtype if dtype is not None else next(model.parameters()).dtype
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {_DTYPES}, got {dtype}")
        if backend not in registry.BACKENDS + ("auto",):
            raise ValueError(f"backend: expected one of {list(registry.BACKENDS) + ['auto']}, "
                             f"got {backend!r}")
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs: expected 'auto', True or False, got {cuda_graphs!r}")
        if cuda_graphs is True and device.type != "cuda":
            raise ValueError(f"cuda_graphs: True needs a CUDA device, got {device}")
        if draw not in DRAWS:
            raise ValueError(f"draw: expected one of {DRAWS}, got {draw!r}")
        _positive_or_none("max_batch_size", max_batch_size)
        _positive_or_none("max_seq_len", max_seq_len)
        linear_backend = _linear_backend(packed_linear, device, dtype)
        weight_dtype = _checked_weight_dtype(weight_dtype, packed_linear, device, dtype)
        act_dtype = _checked_act_dtype(act_dtype, weight_dtype)
        if weight_dtype is not None:
            linear_backend = "cpu"
        if backend != "auto":   # an unusable backend fails here, before the model is moved
            Kernels.resolve(backend, device=device, dtype=dtype, head_dim=model.config.head_dim,
                            block_size=model.config.block_size, step_lens=(model.config.block_size,))
        if max_seq_len is not None and max_seq_len > model.config.max_seq_len:
            raise ValueError(f"max_seq_len: expected at most the model's position table "
                             f"({model.config.max_seq_len}), got {max_seq_len}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer.to(device).eval() if tokenizer is not None else None
        self.config = model.config
        self.device, self.dtype, self.backend, self.draw = device, dtype, backend, draw
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.use_graphs = device.type == "cuda" and cuda_graphs in ("auto", True)
        self.compile = compile
        # packing copies the weights: done once per generator, not per request
        self.weight_dtype, self.act_dtype = weight_dtype, act_dtype
        make_linear = registry.resolve("linear", linear_backend, device=device, dtype=dtype)
        narrow = {k: v for k, v in (("weight_dtype", weight_dtype), ("act_dtype", act_dtype))
                  if v is not None}
        self.linear = make_linear(self.model, **narrow)
        # CPU decode steps as one C call each where the kernels compute every piece
        # (ModelRunner.programs); False keeps the Python-driven step (A/B runs, debugging)
        self.decode_programs = True
        self.draw_in_program = True   # and the draw in the same call (DecodeStep)
        self.cache: StaticKVCache | None = None
        self._steps: dict[tuple, DecodeStep] = {}
        self._lock = threading.RLock()   # reentrant: predict_frames calls generate_tokens

    # --- cache and step objects ----------------------------------------------
    def _ensure_cache(self, rows: int, need: int) -> StaticKVCache:
        """The static cache for ``rows`` rows, allocated once per (rows, length)."""
        if self.max_seq_len is not None and need > self.max_seq_len:
            raise ValueError(f"max_seq_len: the request needs {need} cached positions, the "
                             f"generator's cache holds {self.max_seq_len}")
        c = self.cache
        if c is None or c.batch != rows or c.max_len < need:
            length = self.max_seq_len or min(self.config.max_seq_len,
                                              -(-need // _LENGTH_QUANTUM) * _LENGTH_QUANTUM)
            self.cache = None
            self._steps.clear()   # captured graphs point into the old storage
            self._check_fits(rows, length, f"batch: {rows} cache rows (the batch, doubled under "
                                           f"classifier-free guidance) of {length} positions")
            c = self.cache = StaticKVCache.for_model(self.config, rows, length, device=self.device,
                                                     dtype=self.dtype)
        c.check_capacity(rows, need)
        c.reset()
        return c

    def _check_fits(self, rows: int, length: int, what: str) -> None:
        """Refuse, before allocating, a request whose KV cache ([2, n_layer, rows, n_head,
        length, head_dim] in the generator's dtype) and a step's float32 logits and
        sampler copy ([rows, block_size, vocab_size] twice) exceed the device's free memory."""
        c = self.config
        item = torch.empty((), dtype=self.dtype).element_size()
        cache = 2 * c.n_layer * rows * c.n_head * length * c.head_dim * item
        logits = 2 * rows * c.block_size * c.vocab_size * 4
        devices.check_fits(cache + logits, self.device, what)

    def check_batch_fits(self, batch_size: int, *, cfg: bool = False) -> None:
        """Raise ValueError naming ``batch_size`` if that many sequences (doubled with
        classifier-free guidance, ``cfg``) of the model's whole position table cannot fit
        in the device's memory. Call it before preparing a large batch's inputs; every
        request checks its own size again before its cache is allocated."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        rows = 2 * batch_size if cfg else batch_size
        length = self.config.max_seq_len
        self._check_fits(rows, length, f"batch_size: {batch_size} sequences ({rows} cache rows "
                                       f"of {length} positions)")

    def _runner(self, plan: StepPlan, cond_len: int, length: int) -> ModelRunner:
        """The request's runner, its attention implementations resolved here, once."""
        kernels = Kernels.resolve(self.backend, device=self.device, dtype=self.dtype,
                                  head_dim=self.config.head_dim, block_size=plan.block_size,
                                  step_lens=plan.tokens[1:])
        return ModelRunner(self.model, self.cache, kernels=kernels, block_size=plan.block_size,
                           hybrid=plan.hybrid, cond_len=cond_len, length=length,
                           linear=self.linear, programs=self.decode_programs)

    def _step(self, runner: ModelRunner, sampler: BatchedSampler, batch: int, n: int,
              temperature: float, cfg: bool, length: int) -> DecodeStep:
        p = sampler.params
        key = (self.cache.batch, n, length, runner.block_size, runner.hybrid, runner.cond_len,
               p.do_sample, p.top_k, p.top_p, temperature, cfg, sampler.draw)
        step = self._steps.get(key)
        if step is None:
            compiled = torch.compile(runner.decode, dynamic=False) if self.compile else None
            step = DecodeStep(runner, sampler, batch=batch, n=n, cfg=cfg, use_graph=self.use_graphs and sampler.graph_safe, compiled=compiled)
            self._steps[key] = step
        step.sampler, step.draw_in_program = sampler, self.draw_in_program
        return step

    # --- token generation ----------------------------------------------------
    def _prefill_inputs(self, ids: torch.Tensor, cond_len: int, cfg: bool):
        """Rows fed to the model: ids [B, S] -> ([rows, S], prefix embeddings or None)."""
        if not cfg:
            return ids, None
        B = ids.shape[0]
        cond = self.model.tok_emb(ids[:, :cond_len])
        uncond = self.model.uncond_embedding.to(cond.dtype).expand(B, -1, -1)
        return torch.cat([ids, ids]), torch.cat([cond, uncond])

    @_serialized
    @torch.no_grad()
    def generate_tokens(self, input_ids: torch.Tensor, num_new_tokens: int, *, cond_len: int = 0,
                        mode: str = "nbp", do_sample: bool = True, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        cfg_scale: float | None = None, cfg_schedule: str = "constant",
                        generator: torch.Generator | None = None, callback=None,
                        progress: bool = False) -> torch.Tensor:
        """Generate ``num_new_tokens`` ids after ``input_ids`` (docs/design.md, "Data flow").

        input_ids: int64 [B, S], the model's own ids (condition first, ``cond_len``
        of them; hybrid: condition + begin-of-video). callback(step, tokens int64
        [B, n]) is called after every step. Returns int64 [B, num_new_tokens] on
        the generator's device (hybrid fillers removed).
        """
        steps = self.stream_tokens(input_ids, num_new_tokens, cond_len=cond_len, mode=mode,
                                   do_sample=do_sample, temperature=temperature, top_k=top_k,
                                   top_p=top_p, cfg_scale=cfg_scale, cfg_schedule=cfg_schedule,
                                   generator=generator, progress=progress)
        for s, tokens in steps:
            if callback is not None:
                callback(s, tokens)
        return steps.out

    def stream_tokens(self, input_ids: torch.Tensor, num_new_tokens: int, *, cond_len: int = 0,
                      mode: str = "nbp", do_sample: bool = True, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      cfg_scale: float | None = None, cfg_schedule: str = "constant",
                      generator: torch.Generator | None = None,
                      progress: bool = False) -> TokenSteps:
        """``generate_tokens`` as an iterator of (step, tokens int64 [B, n]), one item per step,
        in the order they are drawn (``TokenSteps``). The arguments are checked here; the
        cache is claimed and the prefill run on the first ``next``. From then until the
        iterator is exhausted or closed, the iterating thread holds the generator's lock
        (other threads' requests wait: they share the cache).
        """
        params = SamplingParams(do_sample, temperature, top_k, top_p, cfg_scale, cfg_schedule)
        check_generator(generator, self.device if do_sample and self.draw == "multinomial" else None)
        plan = plan_steps(self.config, mode, num_new_tokens)
        check_generation_inputs(self.config, input_ids, plan, cond_len, cfg_scale is not None)
        B, S = input_ids.shape
        if self.max_batch_size is not None and B > self.max_batch_size:
            raise ValueError(f"input_ids: batch {B} exceeds max_batch_size {self.max_batch_size}")
        need = S + sum(plan.tokens[1:])
        if self.max_seq_len is not None and need > self.max_seq_len:
            raise ValueError(f"max_seq_len: the request needs {need} cached positions, the "
                             f"generator's cache holds {self.max_seq_len}")
        out = torch.empty(B, num_new_tokens, dtype=torch.long, device=self.device)
        return TokenSteps(out, self._run_steps(input_ids, cond_len, params, plan, out, generator,
                                               progress))

    @torch.no_grad()
    def _run_steps(self, input_ids: torch.Tensor, cond_len: int, params: SamplingParams,
                   plan: StepPlan, out: torch.Tensor, generator, progress: bool):
        """The prefill (step 0), then the decode loop; yields (step, out's slice of that step)."""
        with self._lock:
            yield from self._locked_steps(input_ids, cond_len, params, plan, out, generator,
                                          progress)

    def _locked_steps(self, input_ids: torch.Tensor, cond_len: int, params: SamplingParams,
                      plan: StepPlan, out: torch.Tensor, generator, progress: bool):
        """``_run_steps`` once the lock is held: claim the cache, prefill, decode."""
        B, S = input_ids.shape
        cfg = params.cfg_scale is not None
        need = S + sum(plan.tokens[1:])
        self._ensure_cache(2 * B if cfg else B, need)
        length = min(self.cache.max_len, -(-need // _LENGTH_QUANTUM) * _LENGTH_QUANTUM)
        runner = self._runner(plan, cond_len, length)
        sampler = BatchedSampler(params, self.draw)
        noise = (sampler.noise(B * out.shape[1], generator, self.device) if sampler.needs_noise
                 else None)
        ids = input_ids.to(self.device).long()
        rows, prefix = self._prefill_inputs(ids, cond_len, cfg)
        weight = torch.tensor(cfg_weight(params, 0), dtype=torch.float64) if cfg else None
        n0 = plan.tokens[0]
        tokens, invalid = sampler(runner.prefill(rows, prefix, n0), weight,
                                  None if noise is None else noise[:B * n0], generator)
        invalid_steps = InvalidSteps(len(plan.tokens), self.device)
        invalid_steps.record(0, invalid)
        out[:, :n0] = tokens
        yield 0, out[:, :n0]
        yield from self._decode_loop(runner, sampler, plan, out, noise, generator, progress,
                                     length, S, invalid_steps)
        invalid_steps.check()

    def _decode_loop(self, runner: ModelRunner, sampler: BatchedSampler, plan: StepPlan,
                     out: torch.Tensor, noise, generator, progress: bool,
                     length: int, cached: int, invalid_steps: InvalidSteps):
        """Steps 1.. of ``plan``: feed the previous step's tokens (+ fillers), draw the next;
        yields (step, out's slice of that step). One CPU sequence whose steps are all
        ``DecodeProgram.draw`` calls runs them in a ``ProgramLane`` (in place in out).

        No host synchronisation: offsets and lengths are Python ints from the plan
        (``cached``: positions in the cache after the prefill).
        """
        B, params = out.shape[0], sampler.params
        cfg = params.cfg_scale is not None
        steps = range(1, len(plan.tokens))
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"nbp {plan.mode}", unit="step")
        offset, prev = plan.tokens[0], out[:, :plan.tokens[0]]
        lane = None if cfg or len(plan.tokens) < 2 else ProgramLane.build(
            self._step(runner, sampler, B, plan.tokens[1], params.temperature, cfg, length),
            plan, out, noise)
        for s in steps:
            n = plan.tokens[s]
            cached += n
            if lane is not None:   # the same steps, without torch ops between them
                step, prev = lane.step, lane.run(s, cached)
            else:
                step = self._fed_step(runner, sampler, plan, prev, s, noise, offset, length)
                out[:, offset:offset + n].copy_(step.run(generator, cached))
                prev = out[:, offset:offset + n]
            if not step.valid_on_host:
                invalid_steps.record(s, step.invalid)
            yield s, prev
            offset += n

    def _fed_step(self, runner: ModelRunner, sampler: BatchedSampler, plan: StepPlan,
                  prev: torch.Tensor, s: int, noise, offset: int, length: int) -> DecodeStep:
        """Step s's DecodeStep with its inputs in place: the previous step's tokens prev
        int64 [B, k] (+ fillers after ``plan.filler_after``), duplicated for guidance with
        its weight, and the step's uniforms from noise."""
        B, n, params = prev.shape[0], plan.tokens[s], sampler.params
        cfg = params.cfg_scale is not None
        step = self._step(runner, sampler, B, n, params.temperature, cfg, length)
        k = prev.shape[1]
        step.ids[:B, :k].copy_(prev)
        if s - 1 == plan.filler_after:
            step.ids[:B, k:].copy_(plan.fillers(B, prev.device))
        if cfg:
            step.ids[B:].copy_(step.ids[:B])
            step.cfg_weight.fill_(cfg_weight(params, s))
        if noise is not None:
            step.noise.copy_(noise[offset * B:(offset + n) * B])
        return step

    # --- video-level tasks (the token layout lives in nbp.layout) --------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("tokenizer: this task encodes/decodes video; create the "
                             "FastGenerator with tokenizer=...")
        return self.tokenizer

    @_serialized
    @torch.no_grad()
    def decode_ids(self, video_ids: torch.Tensor) -> torch.Tensor:
        """Block-major model ids int64 [B, t*h*w] -> decoded video float32 [B, 3, T, H, W] in
        [0, 1] (ids outside the video range are clamped, see ``layout.ids_to_codes``)."""
        tok = self._require_tokenizer()
        return tok.decode(layout.ids_to_codes(self.config, video_ids))

    @torch.no_grad()
    def _given_ids(self, video: torch.Tensor, num_cond_frames: int) -> torch.Tensor:
        """Encoded given frames as block-major model ids int64 [B, n] on the device."""
        tok = self._require_tokenizer()
        frames = layout.given_frames(video, num_cond_frames, tok.config.factors[0])
        codes = tok.encode(frames.to(self.device))                  # [B, n_lat, h, w]
        return layout.codes_to_ids(self.config, codes, name="video (its given frames encoded)")

    @_serialized
    @torch.no_grad()
    def frame_prompt(self, video: torch.Tensor, num_cond_frames: int = 5, *, class_ids=None,
                     cond_ids=None) -> layout.Prompt:
        """The frame-prediction request (``layout.Prompt``): ``[condition, bov, given codes]``.

        video: float [B, 3, T, H, W] in [0, 1]; only the first ``num_cond_frames``
        (1 + k * the tokenizer's time factor, at most T) are encoded. class_ids /
        cond_ids: the condition of conditional models (``layout.condition_ids``).
        """
        cfg = self.config
        self._require_tokenizer()
        layout.check_frame_prediction(cfg)
        batch = video.shape[0] if isinstance(video, torch.Tensor) and video.dim() == 5 else None
        cond = layout.condition_ids(cfg, class_ids, cond_ids, batch_size=batch)
        if batch is not None:   # before the frames are encoded: a batch that cannot fit costs nothing
            self.check_batch_fits(batch)
        given = self._given_ids(video, num_cond_frames)
        return layout.frame_prediction_prompt(cfg, cond.to(self.device), given)

    @_serialized
    @torch.no_grad()
    def predict_frames(self, video: torch.Tensor, num_cond_frames: int = 5, *, class_ids=None,
                       cond_ids=None, mode: str = "nbp", num_frames: int | None = None,
                       window: int | None = None, **sampling) -> torch.Tensor:
        """Frame prediction: continue the first ``num_cond_frames`` frames of ``video``.

        Serves frame-prediction models (no condition, no begin-of-video id: the
        K600 layout) and non-hybrid models with a begin-of-video id; conditional
        ones need ``class_ids`` (int [B]) or ``cond_ids`` (int [B, cond_len]). A
        class-conditional model given a clip it was not trained on can take
        ``most_likely_class(video, num_cond_frames)``.
        video: float [B, 3, T, H, W] in [0, 1] (T >= num_cond_frames). The given
        frames are encoded, their latent frames kept as the prefix, the rest of
        the latent grid (config.latent_shape) generated, and everything decoded.
        ``sampling``: keyword arguments of ``generate_tokens``. Returns float32
        [B, 3, T', H, W]: the tokenizer's reconstruction of the given frames,
        then the predicted ones. num_frames: T' = 1 + f_t k frames, any length,
        past the trained one with a rolling window of ``window`` latent frames
        (``nbp.long_video``; None: the trained length).
        """
        if num_frames is not None:
            return long_video.predict_frames(self, video, num_cond_frames, num_frames=num_frames,
                                             window=window, class_ids=class_ids,
                                             cond_ids=cond_ids, mode=mode, **sampling)
        prompt = self.frame_prompt(video, num_cond_frames, class_ids=class_ids, cond_ids=cond_ids)
        new = self.generate_tokens(prompt.ids, prompt.num_new_tokens, cond_len=prompt.cond_len,
                                   mode=mode, **sampling)
        return self.decode_ids(prompt.video_ids(new))

    @_serialized
    @torch.no_grad()
    def most_likely_class(self, video: torch.Tensor, num_cond_frames: int = 5, *,
                          max_rows: int | None = None) -> torch.Tensor:
        """The class (int64 [B], CPU) under which a class-conditional model (cond_len 1) finds
        the given frames' codes most likely.

        One teacher-forced forward scores the codes of the first ``num_cond_frames``
        frames of ``video`` (float [B, 3, T, H, W] in [0, 1]) under every class
        (``layout.class_scoring_sequences``), ``max_rows`` (video, class) rows at a
        time (default: one video's classes). Use it to pick ``class_ids`` for
        ``predict_frames`` when a clip has no label. For footage unlike the
        model's training data the class means nothing and the prediction is crude.
        """
        cfg = self.config
        if cfg.cond_len != 1:
            raise ValueError(f"most_likely_class: needs a class-conditional model (cond_len 1), "
                             f"this one has cond_len {cfg.cond_len}")
        _positive_or_none("max_rows", max_rows)
        given = self._given_ids(video, num_cond_frames)
        inputs, targets = layout.class_scoring_sequences(cfg, given)
        rows = max_rows or cfg.cond_vocab_size
        nll = torch.cat([self._sequence_nll(inputs[i:i + rows], targets[i:i + rows])
                         for i in range(0, inputs.shape[0], rows)])
        return nll.view(given.shape[0], cfg.cond_vocab_size).argmin(dim=1).cpu()

    def _sequence_nll(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed negative log-likelihood float32 [R] of targets int64 [R, S] (-100 ignored)."""
        logits = self.model(inputs, self.config.cond_len).float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                ignore_index=layout.IGNORE, reduction="none")
        return nll.sum(dim=1)

    @_serialized
    @torch.no_grad()
    def generate_video(self, class_ids=None, cond_ids=None, *, batch_size: int | None = None,
                       mode: str | None = None, num_frames: int | None = None,
                       window: int | None = None, **sampling) -> torch.Tensor:
        """A whole video from a class id per sample (cond_len = 1), condition ids
        [B, cond_len] (e.g. text tokens), or nothing (unconditional models with a
        begin-of-video id; ``batch_size`` samples). mode: default "hybrid" for
        hybrid models, else "nbp". Returns float32 [B, 3, T, H, W] in [0, 1].
        num_frames: T = 1 + f_t k frames, past the trained length with a rolling
        window of ``window`` latent frames (``nbp.long_video``; None: the trained length).
        """
        if num_frames is not None:
            return long_video.generate_video(self, class_ids, cond_ids, num_frames=num_frames,
                                             window=window, batch_size=batch_size, mode=mode,
                                             **sampling)
        self._require_tokenizer()
        cond = layout.condition_ids(self.config, class_ids, cond_ids, batch_size=batch_size)
        prompt = layout.video_prompt(self.config, cond)
        mode = mode or ("hybrid" if self.config.hybrid else "nbp")
        new = self.generate_tokens(prompt.ids, prompt.num_new_tokens, cond_len=prompt.cond_len,
                                   mode=mode, **sampling)
        return self.decode_ids(prompt.video_ids(new))

    def stream_frames(self, video: torch.Tensor | None = None, num_cond_frames: int = 5, *,
                      num_frames: int, window: int | None = None, **kwargs):
        """Decoded frames as their latent frames complete: an iterator of float32
        [B, 3, n, H, W] in [0, 1], n = 1 for the first latent frame, then f_t.

        With ``video``: frame prediction (as ``predict_frames``), else a whole video
        (as ``generate_video``), ``num_frames`` long (1 + f_t k, any k). ``kwargs``:
        class_ids, cond_ids, batch_size, mode, reencode and the sampling arguments
        (``nbp.long_video.stream_frames``). This generator serves nothing else until
        the iterator is exhausted.
        """
        return long_video.stream_frames(self, video, num_cond_frames, num_frames=num_frames,
                                        window=window, **kwargs)
