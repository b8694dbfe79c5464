"""Choosing tokens: shaping logits (logit bias, repetition / frequency / presence penalties), warping
them (temperature, top-k, min-p, top-p), sampling, and the special ids (EOS, pad) generation uses.
Plain decoding (nestlm.generate), budget schedules and speculative decoding share these.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import DecodingError

if TYPE_CHECKING:
    from .model import HybridLM


KV_AHEAD = 64  # a cache starts with room for this many new tokens and grows (doubling) as they come


def kv_capacity(prompt_len: int, new_tokens: int) -> int:
    """The initial KV length of a cache: the prompt and up to KV_AHEAD new tokens, not the whole
    ``new_tokens`` up front (AttentionState doubles its buffers when they fill)."""
    return prompt_len + min(max(new_tokens, 0), KV_AHEAD)


@dataclass(frozen=True)
class Shaping:
    """What changes the logits before temperature and truncation, as OpenAI and vLLM define it:
    ``logit_bias`` (token id, bias) pairs added to the logits; then ``repetition_penalty`` (a logit
    of a token in the prompt or the completion so far is divided by it when positive, multiplied
    when negative), ``frequency_penalty`` (times the count of the token in the completion so far)
    and ``presence_penalty`` (once if it occurs there) subtracted. Greedy decoding takes the argmax
    of the shaped logits. Hashable: requests with equal shaping may share a batched call."""

    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def of(
        cls,
        logit_bias: dict[int, float] | None = None,
        presence_penalty: float | None = 0.0,
        frequency_penalty: float | None = 0.0,
        repetition_penalty: float | None = 1.0,
    ) -> Shaping | None:
        """The shaping of these arguments, or None when it changes nothing."""
        bias = tuple(sorted((int(t), float(b)) for t, b in (logit_bias or {}).items()))
        rp = 1.0 if repetition_penalty is None else float(repetition_penalty)
        s = cls(bias, float(presence_penalty or 0.0), float(frequency_penalty or 0.0), rp)
        values = [b for _, b in bias] + [s.presence_penalty, s.frequency_penalty, rp]
        if not all(math.isfinite(v) for v in values) or rp <= 0:
            raise DecodingError("logit_bias and the penalties must be finite, repetition_penalty > 0")
        changes = any(b for _, b in bias) or s.presence_penalty or s.frequency_penalty or rp != 1.0
        return s if changes else None


class LogitShaper:
    """:class:`Shaping` over a batch: the completion's token counts per row, and which tokens each
    row's prompt holds (for ``repetition_penalty``). ``contexts[b]`` are row b's tokens so far and
    ``starts[b]`` where its completion begins in them (a budget schedule's later phases start with
    the completion of the earlier ones). Every operation is per row: a row shapes what it would alone."""

    def __init__(self, shaping: Shaping, contexts: list[list[int]], starts: list[int], vocab: int, device) -> None:
        bad = [t for t, _ in shaping.logit_bias if not 0 <= t < vocab]
        if bad:
            raise DecodingError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")
        self.s = shaping
        self.bias = None
        if shaping.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            ids, vals = zip(*shaping.logit_bias, strict=True)
            self.bias[torch.tensor(ids, device=device)] = torch.tensor(vals, device=device)
        self.counts = torch.zeros(len(contexts), vocab, device=device)
        self.seen = torch.zeros(len(contexts), vocab, dtype=torch.bool, device=device)
        for b, (ctx, start) in enumerate(zip(contexts, starts, strict=True)):
            self.seen[b, torch.tensor(ctx[:start], dtype=torch.long, device=device)] = True
            self.add_row(b, ctx[start:])

    @classmethod
    def of_batch(
        cls, shaping: Shaping, input_ids: torch.Tensor, mask: torch.Tensor | None, starts: Any, vocab: int
    ) -> LogitShaper:
        """For a left-padded batch; ``starts``: None (the completion starts after the input), or where
        each row's completion starts in its real tokens (an int for all rows, or one per row)."""
        B = input_ids.shape[0]
        rows = [(input_ids[b] if mask is None else input_ids[b][mask[b].bool()]).tolist() for b in range(B)]
        if starts is None:
            starts = [len(r) for r in rows]
        elif isinstance(starts, int):
            starts = [starts] * len(rows)
        return cls(shaping, rows, list(starts), vocab, input_ids.device)

    def add_row(self, b: int, toks: list[int]) -> None:
        """Row b's completion grew by ``toks``."""
        if toks:
            idx = torch.tensor(toks, dtype=torch.long, device=self.counts.device)
            self.counts[b].index_add_(0, idx, torch.ones(len(toks), device=self.counts.device))

    def add(self, toks: torch.Tensor, rows: torch.Tensor) -> None:
        """Each row b with ``rows[b]`` grew by toks[b]."""
        self.counts.scatter_add_(1, toks[:, None], rows.to(self.counts.dtype)[:, None])

    def __call__(self, logits: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """Shaped logits (B, vocab) in float32; ``extra`` (B, j): tokens that follow the counted ones
        (drafts a speculative round has not kept yet)."""
        s, x, counts = self.s, logits.float(), self.counts
        if self.bias is not None:
            x = x + self.bias
        if extra is not None and extra.shape[1]:
            counts = counts.scatter_add(1, extra, torch.ones_like(extra, dtype=counts.dtype))
        if s.repetition_penalty != 1.0:
            rp = s.repetition_penalty
            x = torch.where(self.seen | (counts > 0), torch.where(x > 0, x / rp, x * rp), x)
        if s.frequency_penalty:
            x = x - s.frequency_penalty * counts
        if s.presence_penalty:
            x = x - s.presence_penalty * (counts > 0).to(x.dtype)
        return x


def warp_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Logits (B, vocab) after temperature, top-k, min-p (tokens less likely than min_p times the most
    likely one go) and top-p: what sampling draws from (softmax of these)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if min_p is not None and min_p > 0:
        floor = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
        logits = logits.masked_fill(logits < floor, -torch.inf)
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    return logits


def warped_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, min_p: float | None = None
) -> torch.Tensor:
    """softmax of :func:`warp_logits`, refused (DecodingError) where it is not a distribution (a
    temperature so small that the logits overflow): no draw from NaN."""
    probs = warp_logits(logits, temperature, top_k, top_p, min_p).softmax(-1)
    if not bool(torch.isfinite(probs).all()) or bool((probs.sum(-1) <= 0).any()):
        raise DecodingError(f"sampling at temperature {temperature} gives no finite distribution over these logits")
    return probs


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
    min_p: float | None = None,
) -> torch.Tensor:
    """Choose the next token of each row from logits (B, vocab)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = warped_probs(logits, temperature, top_k, top_p, min_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_rows(
    logits: torch.Tensor,
    draw: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generators: list[torch.Generator],
    min_p: float | None = None,
) -> torch.Tensor:
    """The next token of each row from logits (B, vocab), row b drawn from its own generator
    ``generators[b]`` where ``draw[b]`` (the argmax elsewhere: a token nobody keeps). Each row draws
    as :func:`sample_next` on that row alone would: what its solo run with that generator draws."""
    tok = logits.argmax(dim=-1)
    for b in draw.nonzero().flatten().tolist():
        tok[b] = sample_next(logits[b : b + 1], True, temperature, top_k, top_p, generators[b], min_p)[0]
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
