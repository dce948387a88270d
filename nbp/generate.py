"""FastGenerator: static KV cache, one block per decode step, batched sampling, CUDA graphs.

Same semantics as ``nbp.reference.generate_tokens`` (the step plan and input
checks come from ``nbp.schedule``, sampling from ``nbp.sampling`` /
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

import torch

from nbp_kernels.packed_linear import is_available as packed_linear_available

from .blocks import from_block_order, to_block_order
from .cache import StaticKVCache
from .decode import DecodeStep, ModelRunner, PackedLinears
from .model import NBPTransformer, call_module
from .sampler import DRAWS, BatchedSampler, InvalidSteps
from .sampling import SamplingParams, cfg_weight, check_generator
from .schedule import StepPlan, check_generation_inputs, plan_steps

__all__ = ["FastGenerator"]

_BACKENDS = ("auto", "torch", "triton", "cuda", "reference")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LENGTH_QUANTUM = 64   # cache views are rounded up so nearby request lengths share graphs


def _positive_or_none(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}: expected None or a positive int, got {value!r}")


def _use_packed_linear(packed_linear, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps run their linears through ``nbp_kernels.packed_linear``."""
    if packed_linear not in ("auto", True, False):
        raise ValueError(f"packed_linear: expected 'auto', True or False, got {packed_linear!r}")
    if packed_linear is False:
        return False
    if device.type != "cpu" or dtype != torch.float32:
        ok, why = False, f"it needs float32 on the CPU, the generator runs {dtype} on {device}"
    else:
        ok, why = packed_linear_available()
    if not ok and packed_linear is True:
        raise ValueError(f"packed_linear: True, but the kernel is not usable: {why}")
    return ok


class FastGenerator:
    """Fast generation with an ``NBPTransformer`` (and optionally a ``VideoTokenizer``).

    The model (and tokenizer) are moved to ``device`` and the model cast to
    ``dtype`` in place, then put in eval mode. max_batch_size: largest batch a
    call may pass (None: any); max_seq_len: cache length in positions (None:
    sized by the first request and grown when a longer one comes).
    cuda_graphs: "auto" (on for CUDA), True or False. compile: wrap the decode
    forward in ``torch.compile``. draw: "fast" or "multinomial" (module docstring).
    packed_linear: run the decode steps' linears through
    ``nbp_kernels.packed_linear`` (float32 on CPU; the weights are packed once,
    a second copy of them): "auto" (when usable, see its ``is_available``),
    True (raise if unusable) or False.
    """

    def __init__(self, model: NBPTransformer, tokenizer=None, *, device=None, dtype=None,
                 backend: str = "auto", max_batch_size: int | None = None,
                 max_seq_len: int | None = None, cuda_graphs="auto", compile: bool = False,
                 draw: str = "fast", packed_linear="auto"):
        if not isinstance(model, NBPTransformer):
            raise ValueError(f"model: expected an NBPTransformer, got {type(model).__name__}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        dtype = dtype if dtype is not None else next(model.parameters()).dtype
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {_DTYPES}, got {dtype}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend: expected one of {_BACKENDS}, got {backend!r}")
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs: expected 'auto', True or False, got {cuda_graphs!r}")
        if cuda_graphs is True and device.type != "cuda":
            raise ValueError(f"cuda_graphs: True needs a CUDA device, got {device}")
        if draw not in DRAWS:
            raise ValueError(f"draw: expected one of {DRAWS}, got {draw!r}")
        _positive_or_none("max_batch_size", max_batch_size)
        _positive_or_none("max_seq_len", max_seq_len)
        use_packed = _use_packed_linear(packed_linear, device, dtype)
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
        self.linear = PackedLinears(self.model) if use_packed else call_module
        self.cache: StaticKVCache | None = None
        self._steps: dict[tuple, DecodeStep] = {}

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
            c = self.cache = StaticKVCache.for_model(self.config, rows, length, device=self.device,
                                                     dtype=self.dtype)
        c.check_capacity(rows, need)
        c.reset()
        return c

    def _runner(self, plan: StepPlan, cond_len: int, length: int) -> ModelRunner:
        return ModelRunner(self.model, self.cache, backend=self.backend, mask_block=plan.mask_block,
                           hybrid=plan.hybrid, cond_len=cond_len, length=length,
                           linear=self.linear)

    def _step(self, runner: ModelRunner, sampler: BatchedSampler, batch: int, n: int,
              temperature: float, cfg: bool, length: int) -> DecodeStep:
        p = sampler.params
        key = (self.cache.batch, n, length, runner.mask_block, runner.hybrid, runner.cond_len,
               p.do_sample, p.top_k, p.top_p, temperature, cfg, sampler.draw)
        step = self._steps.get(key)
        if step is None:
            compiled = torch.compile(runner.decode, dynamic=False) if self.compile else None
            step = DecodeStep(runner, sampler, batch=batch, n=n, cfg=cfg, use_graph=self.use_graphs and sampler.graph_safe, compiled=compiled)
            self._steps[key] = step
        step.sampler = sampler
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

    @torch.no_grad()
    def generate_tokens(self, input_ids: torch.Tensor, num_new_tokens: int, *, cond_len: int = 0,
                        mode: str = "nbp", do_sample: bool = True, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        cfg_scale: float | None = None, cfg_schedule: str = "constant",
                        generator: torch.Generator | None = None, callback=None,
                        progress: bool = False) -> torch.Tensor:
        """Generate ``num_new_tokens`` ids after ``input_ids`` (DESIGN.md "Runtime").

        input_ids: int64 [B, S], the model's own ids (condition first, ``cond_len``
        of them; hybrid: condition + begin-of-video). callback(step, tokens int64
        [B, n]) is called after every step. Returns int64 [B, num_new_tokens] on
        the generator's device (hybrid fillers removed).
        """
        params = SamplingParams(do_sample, temperature, top_k, top_p, cfg_scale, cfg_schedule)
        check_generator(generator, self.device if do_sample and self.draw == "multinomial" else None)
        plan = plan_steps(self.config, mode, num_new_tokens)
        check_generation_inputs(self.config, input_ids, plan, cond_len, cfg_scale is not None)
        B, S = input_ids.shape
        if self.max_batch_size is not None and B > self.max_batch_size:
            raise ValueError(f"input_ids: batch {B} exceeds max_batch_size {self.max_batch_size}")
        cfg = cfg_scale is not None
        need = S + sum(plan.tokens[1:])
        self._ensure_cache(2 * B if cfg else B, need)
        length = min(self.cache.max_len, -(-need // _LENGTH_QUANTUM) * _LENGTH_QUANTUM)
        runner = self._runner(plan, cond_len, length)
        sampler = BatchedSampler(params, self.draw)
        noise = sampler.noise(B * num_new_tokens, generator, self.device) if sampler.needs_noise else None
        ids = input_ids.to(self.device).long()
        out = torch.empty(B, num_new_tokens, dtype=torch.long, device=self.device)
        rows, prefix = self._prefill_inputs(ids, cond_len, cfg)
        weight = torch.tensor(cfg_weight(params, 0), dtype=torch.float64) if cfg else None
        n0 = plan.tokens[0]
        tokens, invalid = sampler(runner.prefill(rows, prefix, n0), weight,
                                  None if noise is None else noise[:B * n0], generator)
        invalid_steps = InvalidSteps(len(plan.tokens), self.device)
        invalid_steps.record(0, invalid)
        out[:, :n0] = tokens
        if callback is not None:
            callback(0, out[:, :n0])
        self._decode_loop(runner, sampler, plan, out, noise, generator, callback, progress, length, S,
                          invalid_steps)
        invalid_steps.check()
        return out

    def _decode_loop(self, runner: ModelRunner, sampler: BatchedSampler, plan: StepPlan,
                     out: torch.Tensor, noise, generator, callback, progress: bool,
                     length: int, cached: int, invalid_steps: InvalidSteps) -> None:
        """Steps 1.. of ``plan``: feed the previous step's tokens (+ fillers), draw the next.

        No host synchronisation: offsets and lengths are Python ints from the plan
        (``cached``: positions in the cache after the prefill).
        """
        B, params = out.shape[0], sampler.params
        cfg = params.cfg_scale is not None
        fillers = plan.fillers(B, out.device)
        steps = range(1, len(plan.tokens))
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"nbp {plan.mode}", unit="step")
        offset, prev = plan.tokens[0], out[:, :plan.tokens[0]]
        for s in steps:
            n = plan.tokens[s]
            step = self._step(runner, sampler, B, n, params.temperature, cfg, length)
            k = prev.shape[1]
            step.ids[:B, :k].copy_(prev)
            if s - 1 == plan.filler_after:
                step.ids[:B, k:].copy_(fillers)
            if cfg:
                step.ids[B:].copy_(step.ids[:B])
                step.cfg_weight.fill_(cfg_weight(params, s))
            if noise is not None:
                step.noise.copy_(noise[offset * B:(offset + n) * B])
            cached += n
            out[:, offset:offset + n].copy_(step.run(generator, cached))
            invalid_steps.record(s, step.invalid)
            prev = out[:, offset:offset + n]
            if callback is not None:
                callback(s, prev)
            offset += n

    # --- video-level tasks ---------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("tokenizer: this task encodes/decodes video; create the "
                             "FastGenerator with tokenizer=...")
        return self.tokenizer

    def _codes_to_video(self, tokens: torch.Tensor) -> torch.Tensor:
        """Block-major model ids [B, t*h*w] -> decoded video [B, 3, T, H, W] in [0, 1].

        Ids outside the video range (a trained model does not emit them) are
        clamped to the nearest code so random-weight models still decode.
        """
        cfg, tok = self.config, self._require_tokenizer()
        codes = (tokens - cfg.video_offset).clamp_(0, cfg.codebook_size - 1)
        return tok.decode(from_block_order(codes, cfg.latent_shape, cfg.block_shape))

    @torch.no_grad()
    def predict_frames(self, video: torch.Tensor, num_cond_frames: int = 5, *, mode: str = "nbp",
                       **sampling) -> torch.Tensor:
        """K600-style frame prediction.

        video: float [B, 3, T, H, W] in [0, 1] (T >= num_cond_frames; only the
        first ``num_cond_frames`` frames are read). They are encoded, their
        latent frames kept as the prefix, the rest of the latent grid
        (config.latent_shape) generated, and everything decoded. ``sampling``:
        keyword arguments of ``generate_tokens``. Returns float32 [B, 3, T', H, W].
        """
        cfg, tok = self.config, self._require_tokenizer()
        if cfg.cond_len or cfg.bov:
            raise ValueError("predict_frames: needs a frame-prediction model (no condition, no "
                             "begin-of-video id), like the K600 models; use generate_video")
        if not isinstance(video, torch.Tensor) or video.dim() != 5:
            raise ValueError("video: expected a float tensor [batch, 3, T, H, W] in [0, 1]")
        ft = tok.config.factors[0]
        if not isinstance(num_cond_frames, int) or num_cond_frames < 1 or (num_cond_frames - 1) % ft \
                or num_cond_frames > video.shape[2]:
            raise ValueError(f"num_cond_frames: expected 1 + {ft}k frames (whole latent frames) "
                             f"and at most T = {video.shape[2]}, got {num_cond_frames!r}")
        codes = tok.encode(video[:, :, :num_cond_frames].to(self.device))   # [B, n_lat, h, w]
        t, h, w = cfg.latent_shape
        n_lat = codes.shape[1]
        if tuple(codes.shape[2:]) != (h, w) or n_lat >= t or n_lat % cfg.block_shape[0]:
            raise ValueError(f"video: encodes to a latent grid {tuple(codes.shape[1:])}, which does "
                             f"not start the model's grid {cfg.latent_shape} in whole blocks "
                             f"{cfg.block_shape}")
        prefix = to_block_order(codes, cfg.block_shape) + cfg.video_offset
        new = self.generate_tokens(prefix, (t - n_lat) * h * w, mode=mode, **sampling)
        return self._codes_to_video(torch.cat([prefix, new], dim=1))

    def _condition_ids(self, class_ids, cond_ids, batch_size: int | None) -> torch.Tensor:
        """Model ids [B, cond_len (+1 with bov)] that start a generated video."""
        cfg = self.config
        if class_ids is not None and cond_ids is not None:
            raise ValueError("class_ids, cond_ids: pass at most one")
        if class_ids is not None:
            if cfg.cond_len != 1:
                raise ValueError(f"class_ids: this model's condition is {cfg.cond_len} tokens "
                                 f"(not one class token); pass cond_ids [batch, {cfg.cond_len}]")
            cond_ids = torch.as_tensor(class_ids, dtype=torch.long).reshape(-1, 1)
            if cond_ids.numel() == 0 or int(cond_ids.min()) < 0 \
                    or int(cond_ids.max()) >= cfg.cond_vocab_size:
                raise ValueError(f"class_ids: expected a non-empty list of classes in "
                                 f"[0, {cfg.cond_vocab_size}), got {class_ids!r}")
        if cond_ids is not None:
            cond_ids = torch.as_tensor(cond_ids, dtype=torch.long)
            if cfg.cond_len == 0:
                raise ValueError("cond_ids: this model is unconditional (cond_len = 0)")
            if cond_ids.dim() != 2 or cond_ids.shape[1] != cfg.cond_len or cond_ids.numel() == 0 \
                    or int(cond_ids.min()) < 0 or int(cond_ids.max()) >= cfg.cond_vocab_size:
                raise ValueError(f"cond_ids: expected ids in [0, {cfg.cond_vocab_size}) of shape "
                                 f"[batch, {cfg.cond_len}], got {tuple(cond_ids.shape)}")
            ids = cond_ids + cfg.cond_offset
        elif cfg.cond_len:
            raise ValueError(f"class_ids, cond_ids: this model is conditional ({cfg.cond_len} "
                             f"condition tokens); pass one of them")
        else:
            ids = torch.empty(batch_size or 1, 0, dtype=torch.long)
        if not cfg.bov:
            raise ValueError("generate_video: this model has no begin-of-video id, so it continues "
                             "given frames; use predict_frames")
        # hybrid: one begin-of-video id; otherwise a whole first block of them (NBP needs
        # whole blocks after the condition; nbp.demo's generators use this layout)
        n_bov = 1 if cfg.hybrid else cfg.block_size
        return torch.cat([ids, torch.full((ids.shape[0], n_bov), cfg.bov_id)], dim=1)

    @torch.no_grad()
    def generate_video(self, class_ids=None, cond_ids=None, *, batch_size: int | None = None,
                       mode: str | None = None, **sampling) -> torch.Tensor:
        """A whole video from a class id per sample (cond_len = 1), condition ids
        [B, cond_len] (e.g. text tokens), or nothing (unconditional models with a
        begin-of-video id; ``batch_size`` samples). mode: default "hybrid" for
        hybrid models, else "nbp". Returns float32 [B, 3, T, H, W] in [0, 1].
        """
        self._require_tokenizer()
        ids = self._condition_ids(class_ids, cond_ids, batch_size)
        mode = mode or ("hybrid" if self.config.hybrid else "nbp")
        new = self.generate_tokens(ids, self.config.video_len, cond_len=self.config.cond_len,
                                   mode=mode, **sampling)
        return self._codes_to_video(new)
