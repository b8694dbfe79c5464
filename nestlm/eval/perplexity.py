"""Perplexity of a model (or one budget of it) on held-out token blocks."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(
    model: Any,
    tokens: torch.Tensor,
    seq_len: int = 256,
    batch_size: int = 8,
    max_blocks: int | None = None,
    arch: Any = None,
    budget: str | None = None,
) -> dict[str, float]:
    """Mean next-token cross entropy (nats) and perplexity over consecutive blocks of ``tokens``."""
    n = (tokens.numel() - 1) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise ValueError(f"perplexity needs at least {seq_len + 1} tokens, got {tokens.numel()}")
    x_all = tokens[: n * seq_len].view(n, seq_len)
    y_all = tokens[1 : n * seq_len + 1].view(n, seq_len)
    was = model.training
    model.eval()
    total, count = 0.0, 0
    dev = model.embeddings.weight.device
    for i in range(0, n, batch_size):
        x, y = x_all[i : i + batch_size].to(dev), y_all[i : i + batch_size].to(dev)
        logits = model(x, arch=arch, budget=budget).logits
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    model.train(was)
    ce = total / count
    return {"loss": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": count}
