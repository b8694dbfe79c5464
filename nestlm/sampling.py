"""Choosing tokens: warping logits (temperature, top-k, top-p), sampling, and the special ids
(EOS, pad) generation uses. Plain decoding (nestlm.generate) and speculative decoding share these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import DecodingError

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


def resolve_generator(
    generator: torch.Generator | list[torch.Generator] | tuple | None, seed: int | None, rows: int, device: Any
) -> torch.Generator | list[torch.Generator] | None:
    """``generator=`` as decoding uses it: one generator, one per row (a list of ``rows``), or one seeded
    from ``seed`` when none is given (None when neither is)."""
    gen = list(generator) if isinstance(generator, (list, tuple)) else generator
    if isinstance(gen, list) and len(gen) != rows:
        raise DecodingError(f"generator= as a list needs one generator per row ({rows}), got {len(gen)}")
    if gen is None and seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    return gen


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


def sample_rows(
    logits: torch.Tensor,
    draw: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """The next token of each row from logits (B, vocab), row b drawn from its own generator
    ``generators[b]`` where ``draw[b]`` (the argmax elsewhere: a token nobody keeps). Each row draws
    as :func:`sample_next` on that row alone would: what its solo run with that generator draws."""
    tok = logits.argmax(dim=-1)
    for b in draw.nonzero().flatten().tolist():
        tok[b] = sample_next(logits[b : b + 1], True, temperature, top_k, top_p, generators[b])[0]
    return tok


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
