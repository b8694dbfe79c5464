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


@torch.no_grad()
def solution_perplexity(
    model: Any, tok: Any, problems: list[Any], batch_size: int = 16, budget: str | None = None
) -> dict[str, float]:
    """Mean cross entropy (nats per token) of each problem's worked solution given its question.

    Each row is one problem (``prompt + cot``, then EOS when the tokenizer has one); only the solution
    tokens are targets, as ``data.loss: completion`` trains them. Unlike :func:`perplexity` on a packed
    stream, nothing is scored across problem boundaries and the question is never a target, so a model
    trained on solutions only is measured on what it was trained to predict."""
    rows: list[tuple[list[int], int]] = []
    for p in problems:
        q, a = tok.encode(p.prompt), tok.encode(p.cot)
        eos = [tok.eos_token_id] if getattr(tok, "eos_token_id", None) is not None else []
        rows.append((q + a + eos, len(q)))
    was = model.training
    model.eval()
    dev = model.embeddings.weight.device
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        L = max(len(ids) for ids, _ in chunk) - 1
        x = torch.zeros((len(chunk), L), dtype=torch.long)
        y = torch.full((len(chunk), L), -100, dtype=torch.long)  # -100: not a target (question, padding)
        for r, (ids, n_q) in enumerate(chunk):  # right padding: causal, so padding never reaches a target
            t = torch.tensor(ids)
            x[r, : len(ids) - 1] = t[:-1]
            first = max(n_q, 1)  # the first token of a row has no context to be predicted from
            y[r, first - 1 : len(ids) - 1] = t[first:]
        logits = model(x.to(dev), budget=budget).logits
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y.to(dev).flatten(), reduction="sum"))
        count += int((y != -100).sum())
    model.train(was)
    ce = total / max(count, 1)
    return {"loss": ce, "ppl": math.exp(min(ce, 50.0)), "tokens": count}
