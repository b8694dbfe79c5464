"""Prefill + decode with the per-layer inference cache: greedy, temperature, top-k, top-p.

Batches of prompts of different lengths come left-padded with an ``attention_mask``
(1 = token, 0 = padding), as transformers takes them; padding never reaches the
attention keys or the Mamba state, so each row generates what it would alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .cache import InferenceCache

if TYPE_CHECKING:
    from .model import HybridLM


def warp_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Logits (B, vocab) after temperature, top-k and top-p: what sampling draws from (softmax of these)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose the next token of each row from logits (B, vocab)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generation_defaults(model: HybridLM) -> dict[str, Any]:
    """eos_token_id / pad_token_id of the model directory's generation_config.json, where present.

    transformers' generate takes these over config.json's (real checkpoints often list more
    EOS ids there), so nestlm does too; a value passed to generate() wins over both.
    """
    src = getattr(model, "source_dir", None)
    f = Path(src) / "generation_config.json" if src else None
    if f is None or not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: data[k] for k in ("eos_token_id", "pad_token_id") if data.get(k) is not None}


def special_ids(
    model: HybridLM, eos_token_id: int | list[int] | None, pad_token_id: int | None, device: Any = None
) -> tuple[torch.Tensor, int]:
    """The EOS ids (a LongTensor) and the pad id generation uses: the arguments, else
    generation_config.json, else config.json; the pad id falls back to the first EOS id, else 0."""
    cfg = model.config
    defaults = generation_defaults(model)
    eos = defaults.get("eos_token_id", cfg.eos_token_id) if eos_token_id is None else eos_token_id
    eos_ids = torch.tensor(
        [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long, device=device
    )
    if pad_token_id is None:
        pad_token_id = defaults.get("pad_token_id", cfg.pad_token_id)
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if len(eos_ids) else 0
    return eos_ids, pad_token_id


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
    generator: torch.Generator | None = None,
    on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Return (B, L + new) token ids: the prompt followed by what was generated.

    Rows that emit an EOS token are padded with ``pad_token_id`` afterwards, and
    generation stops once every row has finished (as transformers does).
    ``stop``, when given, is called after each step with the new tokens so far (B, n)
    and returns a bool (B,) of rows that are done too (stop strings, for instance).
    ``generator`` (sampling) is used as given, else one is seeded from ``seed``.
    ``on_step(logits, tokens)``, when given, sees each step's logits (B, vocab) and chosen tokens (B,).
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    spec = model.resolve_arch(arch, budget)
    cfg = model.config
    eos_ids, pad_token_id = special_ids(model, eos_token_id, pad_token_id, input_ids.device)
    gen = generator
    if gen is None and seed is not None:
        gen = torch.Generator(device=input_ids.device).manual_seed(seed)

    Bsz, L = input_ids.shape
    cache = InferenceCache(cfg.n_layers, capacity=L + max_new_tokens)
    out = model(input_ids, arch=spec, cache=cache, attention_mask=attention_mask, num_logits=1)
    tokens = [input_ids]
    unfinished = torch.ones(Bsz, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        nxt = sample_next(out.logits[:, -1], do_sample, temperature, top_k, top_p, gen)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        if on_step is not None:
            on_step(out.logits[:, -1], nxt)
        tokens.append(nxt[:, None])
        if len(eos_ids):
            unfinished &= ~torch.isin(nxt, eos_ids)
        if stop is not None:
            unfinished &= ~stop(torch.cat(tokens[1:], dim=1)).to(unfinished.device)
        if not bool(unfinished.any()) or step == max_new_tokens - 1:
            break
        out = model(nxt[:, None], arch=spec, cache=cache, num_logits=1)
    return torch.cat(tokens, dim=1)
