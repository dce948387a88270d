"""The reference generator: no cache, the whole sequence re-run at every step.

Slow and obviously right; ``FastGenerator`` must agree with it token for
token (greedy) and draw from the same distributions (sampled).
"""
from __future__ import annotations

import torch

from .model import NBPTransformer
from .sampling import (SamplingParams, cfg_weight, check_generator, guided_logits, invalid_rows,
                       invalid_step_error, sample_logits)
from .step_plan import check_generation_inputs, plan_steps

__all__ = ["generate_tokens"]


@torch.no_grad()
def generate_tokens(model: NBPTransformer, input_ids: torch.Tensor, num_new_tokens: int, *,
                    cond_len: int = 0, mode: str = "nbp", do_sample: bool = True,
                    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    cfg_scale: float | None = None, cfg_schedule: str = "constant",
                    generator: torch.Generator | None = None,
                    backend: str = "reference") -> torch.Tensor:
    """Generate ``num_new_tokens`` ids after ``input_ids``.

    input_ids: int64 [B, S], the model's own ids (condition first, ``cond_len``
    of them). Returns int64 [B, num_new_tokens] (hybrid fillers removed).
    """
    params = SamplingParams(do_sample, temperature, top_k, top_p, cfg_scale, cfg_schedule)
    check_generator(generator, input_ids.device if do_sample else None)
    plan = plan_steps(model.config, mode, num_new_tokens)
    check_generation_inputs(model.config, input_ids, plan, cond_len, cfg_scale is not None)
    seq, out = input_ids.long(), []
    run = dict(block_size=plan.block_size, hybrid=plan.hybrid, backend=backend)
    for step, n in enumerate(plan.tokens):
        logits = model(seq, cond_len, **run)[:, -n:]
        weight = None
        if cfg_scale is not None:
            uncond = model(seq, cond_len, prefix_embeddings=model.uncond_embedding, **run)
            logits, weight = torch.cat([logits, uncond[:, -n:]]), cfg_weight(params, step)
        logits = guided_logits(logits, params, weight).flatten(0, 1)
        if bool(invalid_rows(logits).any()):
            raise invalid_step_error(step)
        tokens = sample_logits(logits, params, generator).view(seq.shape[0], n)
        out.append(tokens)
        seq = torch.cat([seq, tokens], dim=1)
        if step == plan.filler_after:
            seq = torch.cat([seq, plan.fillers(seq.shape[0], seq.device)], dim=1)
    return torch.cat(out, dim=1)
