"""Prefill + decode with the per-layer inference cache: greedy, temperature, top-k, top-p, min-p,
logit bias and repetition / frequency / presence penalties (nestlm.sampling).

Batches of prompts of different lengths come left-padded with an ``attention_mask``
(1 = token, 0 = padding), as transformers takes them; padding never reaches the
attention keys or the Mamba state, so each row generates what it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .cache import InferenceCache
from .sampling import (
    LogitShaper,
    Shaping,
    generation_defaults,
    kv_capacity,
    resolve_generator,
    sample_next,
    sample_rows,
    special_ids,
    warp_logits,
)

# what nestlm.decoding.generate takes on top of plain decoding's arguments
SEVERAL_KEYS = {"budget_schedule", "draft_budget", "draft_arch", "num_draft_tokens", "tokenizer", "stats", "on_token"}
SEVERAL_KEYS |= {"row_stop", "on_done"}

__all__ = ["generate", "generation_defaults", "sample_next", "special_ids", "warp_logits"]

if TYPE_CHECKING:
    from .model import HybridLM


@torch.inference_mode()
def generate(
    model: HybridLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    budget: str | None = None,
    arch: Any = None,
    seed: int | None = None,
    stop: Callable[[torch.Tensor], torch.Tensor] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    min_p: float | None = None,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    completion_start: int | list[int] | None = None,
    **several: Any,
) -> torch.Tensor:
    """Return (B, L + new) token ids: the prompt followed by what was generated.

    Rows that emit an EOS token are padded with ``pad_token_id`` afterwards, and
    generation stops once every row has finished (as transformers does).
    ``stop``, when given, is called after each step with the new tokens so far (B, n)
    and returns a bool (B,) of rows that are done too (stop strings, for instance).
    ``generator`` (sampling) is used as given, else one is seeded from ``seed``; a list of them,
    one per row, has each unfinished row draw from its own, as it would alone with that generator.
    ``on_step(logits, tokens)``, when given, sees each step's logits (B, vocab) and chosen tokens (B,).
    ``min_p``, ``logit_bias`` ({token id: bias}) and the penalties: see :class:`nestlm.sampling.Shaping`
    (greedy takes the argmax of the shaped logits; ``on_step`` sees the model's own).
    ``completion_start``: where each row's completion begins in its real tokens (default: after the
    input), for the penalties, which count the completion's tokens.

    Several budgets in one generation (``budget_schedule=``, speculative decoding with
    ``draft_budget=`` / ``draft_arch=`` and ``num_draft_tokens=``): see :func:`nestlm.decoding.generate`.
    """
    bad = sorted(set(several) - SEVERAL_KEYS)
    if bad:
        raise TypeError(f"generate() got an unexpected keyword argument {bad[0]!r}")
    several = {k: v for k, v in several.items() if v is not None}
    if several:
        from .decoding import generate as several_budgets

        args = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k)
        args |= dict(top_p=top_p, attention_mask=attention_mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        args |= dict(budget=budget, arch=arch, seed=seed, stop=stop, generator=generator, min_p=min_p)
        args |= dict(logit_bias=logit_bias, presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
        args |= dict(repetition_penalty=repetition_penalty)
        return several_budgets(model, input_ids, **args, **several)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    spec = model.resolve_arch(arch, budget)
    cfg = model.config
    eos_ids, pad_token_id = special_ids(model, eos_token_id, pad_token_id, input_ids.device)
    gen = resolve_generator(generator, seed, input_ids.shape[0], input_ids.device)
    shaping = Shaping.of(logit_bias, presence_penalty, frequency_penalty, repetition_penalty)

    Bsz, L = input_ids.shape
    cache = InferenceCache(cfg.n_layers, capacity=kv_capacity(L, max_new_tokens))
    out = model(input_ids, arch=spec, cache=cache, attention_mask=attention_mask, num_logits=1)
    shaper = None
    if shaping is not None:
        shaper = LogitShaper.of_batch(shaping, input_ids, attention_mask, completion_start, out.logits.shape[-1])
    tokens = [input_ids]
    unfinished = torch.ones(Bsz, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1] if shaper is None else shaper(out.logits[:, -1])
        if do_sample and isinstance(gen, list):  # finished rows draw nothing, as they would not alone
            nxt = sample_rows(logits, unfinished, temperature, top_k, top_p, gen, min_p)
        else:
            nxt = sample_next(logits, do_sample, temperature, top_k, top_p, gen, min_p)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        if on_step is not None:
            on_step(out.logits[:, -1], nxt)
        if shaper is not None:
            shaper.add(nxt, unfinished)
        tokens.append(nxt[:, None])
        if len(eos_ids):
            unfinished &= ~torch.isin(nxt, eos_ids)
        if stop is not None:
            unfinished &= ~stop(torch.cat(tokens[1:], dim=1)).to(unfinished.device)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        out = model(nxt[:, None], arch=spec, cache=cache, num_logits=1)
    return torch.cat(tokens, dim=1)
