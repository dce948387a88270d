"""``DecodeProgram``: a whole decode step on the CPU in one C call (``cpu/decode_step.c``).

A decode step of the CPU path is ~26 kernel launches; driven from Python each
paid ~20 us of interpreter and ctypes work, and the torch ops between them
(embeddings, views, allocations) ran on caches the weight stream had just
evicted. A program holds everything a step reads and writes (the packed
weights' pointers, the caches, static activation buffers) and runs the same
kernels in the same order from C: the logits are those of the Python-driven
step bit for bit (``tests/test_decode_step_cpu.py``). Semantics:
``reference.decode_step``. ``DecodeProgram.draw`` runs the step and then the
sampler's threshold and draw (``sample_cpu.sample``) over its logits in the same
call, and advances ``seq_lens``: the Python between the two (the sampler's
wrapper, checks, torch ops) cost 0.4-0.8 ms a step on a 2-core Zen 4.

Usable where ``packed_linear``, ``decode_attention`` (and ``int8_linear`` for
int8 activations) and ``decode_step`` compile for the ISA in force; a program
keeps the libraries of the ISA it was built under (``isa``).
"""
from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch

from . import decode_attention_cpu, int8_linear, packed_linear, sample_cpu
from ._cpu_launch import ACTS, check_rc
from .cpu_build import load, usable

__all__ = ["BoundDraw", "DecodeProgram", "LayerParts", "PIECES", "is_available"]

_P, _I64 = ctypes.c_void_p, ctypes.c_int64
# decode_step.c's seconds[] order ("sampler": the draw of DecodeProgram.draw)
PIECES = ("embedding", "linears", "attention", "head", "sampler")


class _Linear(ctypes.Structure):   # decode_step.c's linear_t
    _fields_ = [("fn", _P), ("wp", _P), ("corr", _P), ("scale", _P), ("bias", _P),
                ("gamma", _P), ("beta", _P), ("int8", _I64), ("code", _I64), ("K", _I64),
                ("n_out", _I64), ("norm", _I64), ("act", _I64), ("eps", ctypes.c_double)]


class _Layer(ctypes.Structure):    # layer_t
    _fields_ = [("qkv", _Linear), ("proj", _Linear), ("fc1", _Linear), ("fc2", _Linear),
                ("k_cache", _P), ("v_cache", _P)]


class _Step(ctypes.Structure):     # step_t
    _fields_ = [("n_layer", _I64), ("B", _I64), ("L", _I64), ("H", _I64), ("D", _I64),
                ("vocab", _I64), ("n_pos", _I64), ("cache_strides", _I64 * 3),
                ("tok_emb", _P), ("pos_emb", _P), ("layers", ctypes.POINTER(_Layer)),
                ("head", _Linear), ("attention", _P), ("scale", ctypes.c_double),
                ("x", _P), ("x1", _P), ("qkv", _P), ("att", _P), ("h", _P), ("logits", _P)]


class _Draw(ctypes.Structure):     # draw_t
    _fields_ = [("fn", _P), ("top_k", _I64), ("top_p", ctypes.c_double), ("work", _P)]


@functools.cache
def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    step = [ctypes.POINTER(_Step), _P, _P, _I64, _I64, _I64, _P, _P, _P]
    lib.nbp_decode_step.restype = lib.nbp_decode_draw.restype = ctypes.c_int
    lib.nbp_decode_step.argtypes = step
    lib.nbp_decode_draw.argtypes = [*step, ctypes.POINTER(_Draw), _P, _P, _P]
    return lib


def is_available(int8_act: bool = False) -> tuple[bool, str]:
    """(usable, reason): whether every library a program calls compiles for the ISA in
    force (with ``int8_act``, int8_linear's too)."""
    names = ["packed_linear", "decode_attention"] + (["int8_linear"] if int8_act else [])
    for name in [*names, "decode_step"]:   # the reason returned is decode_step's own
        ok, why = usable(name)
        if not ok:
            return False, f"{name}: {why}"
    return True, why


@dataclass(frozen=True)
class LayerParts:
    """One transformer block's decode pieces: ``qkv`` the stacked [q | k | v] PackedLinear
    (``PackedLinear.stacked``), ``proj``, ``fc1``, ``fc2`` PackedLinears, and the
    LayerNorms read before qkv (``ln1``) and fc1 (``ln2``) as (weight, bias, eps),
    weight/bias float32 [C] or None."""
    qkv: packed_linear.PackedLinear
    proj: packed_linear.PackedLinear
    fc1: packed_linear.PackedLinear
    fc2: packed_linear.PackedLinear
    ln1: tuple
    ln2: tuple


def _check_shapes(layers: list[LayerParts], head, C: int, F: int, V: int) -> None:
    """A ValueError naming the first linear whose (in, out) features are not the step's."""
    want = {"qkv": (C, 3 * C), "proj": (C, C), "fc1": (C, F), "fc2": (F, C)}
    parts = [(f"layers[{i}].{n}", getattr(p, n), w) for i, p in enumerate(layers)
             for n, w in want.items()] + [("head", head, (C, V))]
    for name, lin, (k, n) in parts:
        got = (lin.in_features, lin.out_features)
        if got != (k, n):
            raise ValueError(f"{name}: expected {k} -> {n} features, got {got[0]} -> {got[1]}")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeProgram:
    """One decode step shape (B sequences x L new tokens) of a model, run by one C call.

    tok_emb float32 [V, C]; pos_emb float32 [n_pos, C]; layers: a LayerParts per
    block (qkv C -> 3C, proj C -> C, fc1 C -> F, fc2 F -> C); ln_f (weight, bias,
    eps) and head (a PackedLinear C -> V); k_cache, v_cache float32 [n_layer, B, H,
    capacity, D] with H D = C (a ``StaticKVCache``'s storage); block: L, the tokens
    of a step. Every PackedLinear runs its kernel (``takes_module`` is not
    consulted: the kernels take any row count). The tensors are referenced, not
    copied: the program sees later in-place changes of the caches (that is the
    point) and must not outlive them. Shapes that disagree raise ValueError naming
    the part.
    """

    def __init__(self, *, tok_emb: torch.Tensor, pos_emb: torch.Tensor,
                 layers: list[LayerParts], ln_f: tuple, head: packed_linear.PackedLinear,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, block: int):
        n_layer, B, H, cap, D = k_cache.shape
        C, V = tok_emb.shape[1], tok_emb.shape[0]
        if len(layers) != n_layer or H * D != C or v_cache.shape != k_cache.shape:
            raise ValueError(f"layers/k_cache/v_cache: expected {n_layer} layers and caches "
                             f"[n_layer, B, H, capacity, D] with H * D = {C}")
        for t, name in ((tok_emb, "tok_emb"), (pos_emb, "pos_emb"), (k_cache, "k_cache"),
                        (v_cache, "v_cache")):
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous float32 CPU tensor")
        if pos_emb.dim() != 2 or pos_emb.shape[1] != C:
            raise ValueError(f"pos_emb: expected [n_pos, {C}], got {tuple(pos_emb.shape)}")
        F = layers[0].fc1.out_features if layers else 4 * C
        _check_shapes(layers, head, C, F, V)
        self.libs, self.isa = self._libraries(any(p.act_dtype in int8_linear.ACT_DTYPES for p
                                                  in (head, *(q.qkv for q in layers))))
        rows = B * block
        self.B, self.L, self.H, self.D, self.capacity = B, block, H, D, cap
        self._buffers = {name: torch.empty(rows, width) for name, width in
                         (("x", C), ("x1", C), ("qkv", 3 * C), ("att", C), ("h", F),
                          ("logits", V))}
        self._keep = (tok_emb, pos_emb, layers, ln_f, head, k_cache, v_cache)
        self._layers = (_Layer * n_layer)(*(
            _Layer(self._linear(p.qkv, p.ln1), self._linear(p.proj), self._linear(p.fc1, p.ln2,
                                                                                  "gelu"),
                   self._linear(p.fc2), k_cache[i].data_ptr(), v_cache[i].data_ptr())
            for i, p in enumerate(layers)))
        strides = (_I64 * 3)(*k_cache[0].stride()[:3])
        self._step = _Step(n_layer, B, block, H, D, V, pos_emb.shape[0], strides,
                           tok_emb.data_ptr(), pos_emb.data_ptr(), self._layers,
                           self._linear(head, ln_f), self._fn("decode_attention",
                                                              "nbp_decode_attention"),
                           1.0 / math.sqrt(D), *(b.data_ptr() for b in self._buffers.values()))
        self._parts: dict[int, torch.Tensor] = {}
        self._scratch: dict[tuple[int, int], tuple] = {}   # _attention_scratch's
        self.timing: torch.Tensor | None = None   # float64 [len(PIECES)] to time the pieces

    @staticmethod
    def _libraries(int8_act: bool):
        ok, why = is_available(int8_act)
        if not ok:
            raise RuntimeError(f"DecodeProgram is not usable here: {why}")
        libs = {"packed_linear": load("packed_linear")[0],
                "decode_attention": load("decode_attention", decode_attention_cpu._bind)[0]}
        if int8_act:
            libs["int8_linear"], libs["vnni"], _ = int8_linear._load()
        lib, isa, _ = load("decode_step", _bind)
        libs["decode_step"] = lib
        return libs, isa

    def _fn(self, lib: str, name: str) -> int:
        return ctypes.cast(getattr(self.libs[lib], name), _P).value

    def _linear(self, p: packed_linear.PackedLinear, norm: tuple | None = None,
                act: str | None = None) -> _Linear:
        """The C description of PackedLinear p with its prologue and epilogue."""
        int8 = p.act_dtype in int8_linear.ACT_DTYPES
        gamma, beta, eps = norm if norm is not None else (None, None, 0.0)
        code = (int8_linear.mode(self.libs["vnni"], p.act_dtype) if int8
                else packed_linear.kernel_code(p.packed))
        fn = (self._fn("int8_linear", "nbp_int8_linear") if int8
              else self._fn("packed_linear", "nbp_packed_linear"))
        return _Linear(fn, p.packed.data_ptr(), _ptr(p.corr), _ptr(p.scale), _ptr(p.bias),
                       _ptr(gamma), _ptr(beta), int(int8), code, p.in_features, p.out_features,
                       int(norm is not None), ACTS[act], float(eps))

    def __call__(self, ids: torch.Tensor, seq_lens: torch.Tensor, length: int) -> torch.Tensor:
        """ids int64 [B, L] at positions seq_lens[b] + 0..L-1; seq_lens int32 [B] (read, not
        advanced); length: cache positions attention reads (<= capacity). Appends every
        layer's keys/values at seq_lens and returns logits float32 [B, L, V]: the
        program's buffer, overwritten by its next call. With ``timing`` set to a float64
        tensor [5], the call adds to it the seconds of its embeddings, layer linears,
        attention and head (``PIECES``; the benchmarks' step breakdown)."""
        self._check_inputs(ids, seq_lens)
        rc = self.libs["decode_step"].nbp_decode_step(ctypes.byref(self._step), ids.data_ptr(),
                                                      seq_lens.data_ptr(), *self._run_args(length))
        self._check(rc)
        return self.logits

    def draw(self, ids: torch.Tensor, seq_lens: torch.Tensor, length: int, **draw) -> int:
        """The step of ``__call__``, then ``seq_lens += L`` and the draw of
        ``sample_cpu.sample(logits, top_k, top_p, u, work=work)`` into ``tokens``, in one
        C call (``draw``: the keyword arguments of ``bind_draw``). Returns how many rows
        had no distribution (their tokens are -1; ``logits`` still holds the step's
        logits). With ``timing`` set, the draw's seconds go to its "sampler" entry."""
        return self.bind_draw(ids, seq_lens, **draw)(length)

    def bind_draw(self, ids: torch.Tensor, seq_lens: torch.Tensor, *, top_k: int, top_p: float,
                  u: torch.Tensor, work: torch.Tensor, tokens: torch.Tensor) -> "BoundDraw":
        """``draw`` over these tensors, checked once: the returned ``BoundDraw`` takes only
        the length. ids, seq_lens as ``__call__``; u float64 [B L] (one uniform per token);
        work float32 ``sample_cpu.work_shape(B L, V)``; tokens int64 [B, L], written in
        place; all contiguous. A FastGenerator decode step binds its static buffers once:
        after the weight stream of a step every Python and torch call runs on cold
        caches (tens of us each), so the per-step path keeps few of them. The tensors
        must keep their storage while the binding is used."""
        self._check_inputs(ids, seq_lens)
        n = self.B * self.L
        # the sampler's own checks of top_k, top_p and work, then u's and tokens'
        sample_cpu._check_filter(self.logits.view(n, -1), top_k, top_p, work)
        for t, name, dtype, shape in ((u, "u", torch.float64, (n,)),
                                      (tokens, "tokens", torch.int64, (self.B, self.L))):
            sample_cpu._check_tensor(name, t, dtype, shape)
            if not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor")
        lib = self.libs.get("sample_cpu")
        if lib is None:
            lib, _, why = sample_cpu._load()
            if lib is None:
                raise RuntimeError(f"DecodeProgram.draw is not usable here: {why}")
            self.libs["sample_cpu"] = lib
        spec = _Draw(self._fn("sample_cpu", "nbp_sample"), top_k, float(top_p), work.data_ptr())
        return BoundDraw(self, spec, (ids, seq_lens, u, work, tokens))

    @property
    def logits(self) -> torch.Tensor:
        """float32 [B, L, V]: the last step's logits (the program's buffer)."""
        return self._buffers["logits"].view(self.B, self.L, -1)

    def _check_inputs(self, ids: torch.Tensor, seq_lens: torch.Tensor) -> None:
        B, L = self.B, self.L
        if ids.shape != (B, L) or ids.dtype != torch.int64 or not ids.is_contiguous() \
                or ids.device.type != "cpu":
            raise ValueError(f"ids: expected contiguous int64 [{B}, {L}] on the CPU, got "
                             f"{ids.dtype} {tuple(ids.shape)} on {ids.device}")
        if seq_lens.shape != (B,) or seq_lens.dtype != torch.int32 or \
                not seq_lens.is_contiguous() or seq_lens.device.type != "cpu":
            raise ValueError(f"seq_lens: expected int32 [{B}] on the CPU, got {seq_lens.dtype} "
                             f"{tuple(seq_lens.shape)} on {seq_lens.device}")

    def _run_args(self, length: int) -> tuple:
        """nbp_decode_step's arguments after ids and seq_lens, length checked."""
        if not 0 < length <= self.capacity:
            raise ValueError(f"length: expected 1..{self.capacity} (the cache capacity), got "
                             f"{length}")
        t = self.timing
        if t is not None and (t.dtype != torch.float64 or tuple(t.shape) != (len(PIECES),)
                              or t.device.type != "cpu" or not t.is_contiguous()):
            raise ValueError(f"timing: expected None or a contiguous float64 CPU tensor "
                             f"[{len(PIECES)}], got {t.dtype} {tuple(t.shape)}")
        threads = max(1, torch.get_num_threads())
        splits, work, parts = self._attention_scratch(threads, length)
        return (length, splits, threads, work.data_ptr(), _ptr(parts), _ptr(t))

    def _attention_scratch(self, threads: int, length: int) -> tuple:
        """(splits, work, parts) of the attention for this thread count and length, kept:
        a step's Python is what DecodeProgram saves."""
        key = (threads, length)
        got = self._scratch.get(key)
        if got is None:
            pairs = self.B * self.H
            splits = decode_attention_cpu.splits_for(pairs, threads,
                                                     -(-length // decode_attention_cpu.CHUNK))
            work = decode_attention_cpu._work(self.libs["decode_attention"], threads, self.L,
                                              self.D)
            parts = self._parts.get(splits) if splits > 1 else None
            if splits > 1 and parts is None:
                parts = self._parts[splits] = torch.empty(pairs * splits * self.L * (self.D + 2))
            got = self._scratch[key] = (splits, work, parts)
        return got

    @staticmethod
    def _check(rc: int) -> None:
        if rc == -3:
            raise ValueError("ids: a token id is outside the vocabulary, or a position outside "
                             "the position table")
        check_rc("decode_step", rc)


class BoundDraw:
    """``DecodeProgram.draw`` with its tensors checked and their pointers taken once
    (``DecodeProgram.bind_draw``); calling it with a length runs the step and the draw and
    returns how many rows had no distribution."""

    def __init__(self, program: DecodeProgram, spec: _Draw, tensors: tuple):
        self.program, self._spec, self._tensors = program, spec, tensors   # kept alive
        ids, seq_lens, u, _, tokens = tensors
        self._bad = ctypes.c_int64(0)
        self._step, self._seq_lens = ctypes.byref(program._step), seq_lens.data_ptr()
        self._spec_ref, self._bad_ref = ctypes.byref(spec), ctypes.byref(self._bad)
        self._own = (ids.data_ptr(), u.data_ptr(), tokens.data_ptr())
        self._fn = program.libs["decode_step"].nbp_decode_draw

    def __call__(self, length: int) -> int:
        return self._run(length, *self._own)

    def at(self, length: int, ids: int, u: int, tokens: int) -> int:
        """``__call__`` over other memory laid out as the bound ids, u and tokens (their
        addresses: blocks of B L int64, float64 and int64, e.g. inside a generation's output
        and uniforms, which the caller has checked hold them)."""
        return self._run(length, ids, u, tokens)

    def _run(self, length: int, ids: int, u: int, tokens: int) -> int:
        rc = self._fn(self._step, ids, self._seq_lens, *self.program._run_args(length),
                      self._spec_ref, u, tokens, self._bad_ref)
        self.program._check(rc)
        return self._bad.value
