"""NBPTransformer: the published GPT-2 style generator, state-dict compatible.

Parameter names match the published checkpoints' ``transformer.*`` keys:
``tok_emb``, ``pos_emb`` [1, max_seq_len, C], ``blocks.{i}.ln1``,
``blocks.{i}.attn.{query,key,value,proj}``, ``blocks.{i}.ln2``,
``blocks.{i}.mlp.{0,2}``, ``ln_f``, ``head`` (no bias) and the buffer
``uncond_embedding`` [cond_len, C] used for classifier-free guidance.

The model is written as small pieces (``embed``, ``Block``, ``logits``) with
attention injected as a function (and, optionally, how a linear layer's
product is computed), so the teacher-forced forward (block-causal attention
over the whole sequence) and the generator's cached decode step share every
weight and every line of the layer math.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import nbp_kernels
from nbp_kernels.torch_ops import call_module  # the default LinearFn: the module's own forward

from .config import TransformerConfig
from .pretrained import Pretrained

__all__ = ["NBPTransformer", "AttendFn", "LinearFn", "call_module", "linear_many", "linear_fused",
           "fusable"]

# attend(q, k, v, layer_idx) -> y; k, v: [B, H, S, D]; q, y: [B, H, Sq, D], the last Sq <= S
# positions (Sq < S only in the last layer of a prefill that keeps fewer rows: run_layers(keep=))
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
# linear(module, x) -> module(x), or the same product computed another way
# (FastGenerator's packed CPU linears for decode steps)
LinearFn = Callable[[nn.Linear, torch.Tensor], torch.Tensor]


def fusable(norm: nn.Module | None, act: nn.Module | None, drop: nn.Module | None) -> bool:
    """Whether a LinearFn's ``fused`` method computes these pieces: a LayerNorm over the last
    dimension (affine or not), the exact GELU (``nn.GELU()``), a dropout that drops nothing."""
    return ((norm is None or (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1))
            and (act is None or (type(act) is nn.GELU and act.approximate == "none"))
            and (drop is None or (type(drop) is nn.Dropout and (drop.p == 0 or not drop.training))))


def linear_many(linear: LinearFn, modules: tuple[nn.Linear, ...], x: torch.Tensor, *,
                norm: nn.LayerNorm | None = None) -> tuple[torch.Tensor, ...]:
    """``linear(m, norm(x))`` for every m of ``modules`` (same input x [..., C]; norm None:
    x as is). A LinearFn with a ``many(modules, x, norm=None)`` method computes them as one
    product (``PackedLinears``: one kernel launch instead of three per layer, the launch cost
    of a decode step, with the LayerNorm as the kernel's prologue)."""
    many = getattr(linear, "many", None)
    if many is not None and norm is not None and fusable(norm, None, None):
        return many(modules, x, norm=norm)
    h = x if norm is None else norm(x)
    return many(modules, h) if many is not None else tuple(linear(m, h) for m in modules)


def linear_fused(linear: LinearFn, module: nn.Linear, x: torch.Tensor, *,
                 norm: nn.LayerNorm | None = None, act: nn.Module | None = None,
                 residual: torch.Tensor | None = None,
                 drop: nn.Dropout | None = None) -> torch.Tensor:
    """``residual + drop(act(linear(module, norm(x))))``, each piece skipped where None;
    x [..., C], residual [..., out_features]. A LinearFn with a ``fused`` method
    (``PackedLinears``) computes it in one kernel launch where it can: norm a LayerNorm,
    act the exact GELU, drop inactive (p == 0 or eval). Otherwise, and for every other
    LinearFn, these torch ops run in this order (the teacher-forced forward and training)."""
    fused = getattr(linear, "fused", None)
    if fused is not None and fusable(norm, act, drop):
        return fused(module, x, norm=norm, act=None if act is None else "gelu", residual=residual)
    y = linear(module, x if norm is None else norm(x))
    y = y if act is None else act(y)
    y = y if drop is None else drop(y)
    return y if residual is None else residual + y


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.n_embd
        self.n_head = cfg.n_head
        self.key = nn.Linear(C, C)
        self.query = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.proj = nn.Linear(C, C)
        self.resid_drop = nn.Dropout(cfg.dropout)

    @property
    def qkv(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The three input projections, in the order ``forward`` unpacks them."""
        return self.query, self.key, self.value

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, S, C = t.shape
        return t.view(B, S, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, attend: AttendFn, layer_idx: int,
                linear: LinearFn = call_module, *, norm: nn.LayerNorm | None = None,
                residual: torch.Tensor | None = None, keep: int | None = None) -> torch.Tensor:
        """x: [B, S, C] -> residual + resid_drop(proj(attention of norm(x))) [B, S, C]
        (norm, residual: None for none; residual [B, S, C], or [B, keep, C] with keep).

        keep: None, or compute only the last ``keep`` positions' outputs [B, keep, C]
        (keys and values still cover all S positions)."""
        if keep is None:
            q, k, v = linear_many(linear, self.qkv, x, norm=norm)
        else:   # queries of the kept positions only
            h = x if norm is None else norm(x)
            k, v = linear_many(linear, (self.key, self.value), h)
            q = linear(self.query, h[:, -keep:])
        q, k, v = self.split_heads(q), self.split_heads(k), self.split_heads(v)
        y = attend(q, k, v, layer_idx)                      # [B, H, Sq, D]
        y = y.transpose(1, 2).reshape(*x.shape[:-2], q.shape[2], x.shape[-1])
        return linear_fused(linear, self.proj, y, residual=residual, drop=self.resid_drop)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C = cfg.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.attn = SelfAttention(cfg)
        # Indices 0 and 2 carry the weights, as in the published state dict.
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, attend: AttendFn, layer_idx: int,
                linear: LinearFn = call_module, keep: int | None = None) -> torch.Tensor:
        """x: [B, S, C] -> [B, S, C], or [B, keep, C]: the last ``keep`` positions only."""
        residual = x if keep is None else x[:, -keep:]
        x = self.attn(x, attend, layer_idx, linear, norm=self.ln1, residual=residual, keep=keep)
        fc1, act, fc2, drop = self.mlp
        h = linear_fused(linear, fc1, x, norm=self.ln2, act=act)
        return linear_fused(linear, fc2, h, residual=x, drop=drop)


class NBPTransformer(Pretrained, nn.Module):
    """Decoder-only transformer over NBP token sequences.

    ``model(input_ids, cond_len=0)`` returns teacher-forced logits [B, S, V]
    (float32 or the parameter dtype) under the NBP mask from the config.
    """

    config_class = TransformerConfig
    model_type = "nbp-transformer"

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.max_seq_len, C))
        self.drop = nn.Dropout(config.dropout)
        uncond = torch.randn(config.cond_len, C)
        # Not scaled on the meta device (a loader's skeleton): arithmetic on meta
        # tensors imports torch's compiler stack, a second on every CLI command.
        self.register_buffer("uncond_embedding", uncond if uncond.is_meta else uncond / C ** 0.5)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- pieces shared with the generator ------------------------------------
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
              prefix_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Token + position embeddings [B, S, C].

        input_ids: int64 [B, S]. positions: int64 [B, S] or [S] (default
        0..S-1). prefix_embeddings: [P, C] or [B, P, C], replacing the token
        embeddings of the first P positions (the unconditional branch of CFG).
        """
        B, S = input_ids.shape
        if positions is None:
            if S > self.config.max_seq_len:
                raise ValueError(f"input_ids: sequence length {S} exceeds max_seq_len "
                                 f"{self.config.max_seq_len} of the position table")
            pos = self.pos_emb[:, :S]
        else:
            pos = self.pos_emb[0, positions]
        x = self.tok_emb(input_ids)
        if prefix_embeddings is not None:
            P = prefix_embeddings.shape[-2]
            x = torch.cat([prefix_embeddings.to(x.dtype).expand(B, P, -1), x[:, P:]], dim=1)
        return self.drop(x + pos)

    def logits(self, x: torch.Tensor, linear: LinearFn = call_module) -> torch.Tensor:
        """Final norm + vocabulary head: [B, S, C] -> [B, S, V]."""
        return linear_fused(linear, self.head, x, norm=self.ln_f)

    def run_layers(self, x: torch.Tensor, attend: AttendFn,
                   linear: LinearFn = call_module, *, keep: int | None = None) -> torch.Tensor:
        """x [B, S, C] through every block -> [B, S, C], or with keep, [B, min(keep, S), C]:
        the last block then computes only the last ``keep`` positions (its attention's
        queries, projection and MLP), as a prefill whose other outputs are unused needs;
        every block's keys and values still cover all S positions."""
        if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
            raise ValueError(f"keep: expected None or a positive int, got {keep!r}")
        keep = None if keep is None or keep >= x.shape[-2] else keep
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, attend, i, linear, keep=keep if i == last else None)
        return x

    def block_causal_attend(self, *, cond_len: int = 0, block_size: int | None = None,
                            hybrid: bool | None = None, backend: str = "auto") -> AttendFn:
        """An attend function applying the NBP mask over the whole sequence."""
        L = self.config.block_size if block_size is None else block_size
        hy = self.config.hybrid if hybrid is None else hybrid

        def attend(q, k, v, layer_idx):
            return nbp_kernels.block_causal_attention(q, k, v, block_size=L, cond_len=cond_len,
                                                      hybrid=hy, backend=backend)
        return attend

    # --- teacher-forced forward ---------------------------------------------
    def forward(self, input_ids: torch.Tensor, cond_len: int = 0, *, block_size: int | None = None,
                hybrid: bool | None = None, prefix_embeddings: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
        """input_ids: int64 [B, S] -> logits [B, S, V].

        Position p's logits predict position p + L (L = block_size, default
        the config's). ``block_size``/``hybrid`` override the config's mask
        (``block_size=1`` gives plain causal NTP).
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an int64 tensor [batch, seq], got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}")
        attend = self.block_causal_attend(cond_len=cond_len, block_size=block_size,
                                          hybrid=hybrid, backend=backend)
        x = self.embed(input_ids.long(), prefix_embeddings=prefix_embeddings)
        return self.logits(self.run_layers(x, attend))

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, cond_len: int = 0,
             **kwargs) -> torch.Tensor:
        """Mean cross-entropy of ``targets`` [B, S] (-100 = ignored) under the forward's logits."""
        logits = self(input_ids, cond_len, **kwargs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
