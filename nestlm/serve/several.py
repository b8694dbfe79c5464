"""Requests with several budgets in one generation (``budget_schedule``, ``draft_budget``): batched
``model.generate`` calls, streamed token by token.

Greedy requests taken in one admission that share a decoding plan (the same budget schedule, or
the same target budget, draft budget and ``num_draft_tokens``) run as ONE ``model.generate``
call over their left-padded prompts. Each row keeps its own ``max_tokens`` (a per-row
``max_new_tokens`` list) and stop strings (``row_stop``): a row generates what it would alone,
so each result equals in-process ``generate`` of that prompt, and a speculative row's accepted
and rejected draft counts are those of its solo run. Sampled requests (temperature > 0) run
alone: a call has one generator, and each seeded request must draw from its own, as in-process
``generate(seed=...)`` does.

Tokens go to their request's sink as the decoder produces them (its ``on_token``). Logprobs are
those of the budget that chose each token: the target's when speculative, a schedule phase's own,
and ``{"logprob": 0.0, "top": []}`` for a schedule's forced tokens (which have no logits). EOS
tokens are not text (one that ends a schedule's phase neither). A request cancelled during the
call gets ("done", "cancelled") and no further event; its row stops at its next token where the
decoder allows (a schedule checks stops in its last phase only). The other requests get "done"
when the call ends. The call runs on the scheduler thread: the batched rows wait meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import torch

from .batching import left_pad, logprob_info

if TYPE_CHECKING:
    from .scheduler import Request, Scheduler


def plan_key(req: Request, name: str | None) -> Hashable | None:
    """Requests of one admission with equal keys run as one batched call; None: this one runs alone."""
    if req.temperature > 0:
        return None
    kw = req.several or {}
    if "budget_schedule" in kw:
        return "schedule", json.dumps(kw["budget_schedule"], sort_keys=True), id(kw.get("tokenizer"))
    return "draft", name, kw.get("draft_budget"), kw.get("num_draft_tokens")


def run_several(sched: Scheduler, reqs: list[Request], name: str | None) -> None:
    """One ``model.generate`` call for ``reqs`` (one plan, see :func:`plan_key`) at target budget ``name``."""
    from ..speculative import SpecStats

    c = sched.counters
    c.several_calls += 1
    c.several_requests += len(reqs)
    c.several_rows = max(c.several_rows, len(reqs))
    c.prefills += len(reqs)
    eos = sched.eos_ids
    new: list[list[int]] = [[] for _ in reqs]  # every token of each row, EOS included
    told = [False] * len(reqs)  # the request has had its last event ("done" cancelled or "error")

    def cancel(i: int) -> None:
        told[i] = True
        c.cancelled += 1
        reqs[i].sink(("done", "cancelled"))

    def on_token(i: int, tok: int, logits: torch.Tensor | None, _budget: str | None = None) -> None:
        new[i].append(tok)
        req = reqs[i]
        if told[i]:
            return
        if req.cancelled:
            cancel(i)
            return
        if tok in eos:
            return
        info = None
        if req.logprobs is not None:
            lp = None if logits is None else torch.log_softmax(logits.float(), dim=-1)
            info = {"logprob": 0.0, "top": []} if lp is None else logprob_info(lp, tok, req.logprobs)
        req.generated.append(tok)
        req.sink(("token", tok, info))

    def row_stop(i: int, toks: list[int]) -> bool:
        req = reqs[i]
        return req.cancelled or (req.stop is not None and req.stop(toks))

    first = reqs[0]
    stats = SpecStats()
    kw: dict[str, Any] = dict(first.several or {}, on_token=on_token, row_stop=row_stop)
    if "budget_schedule" not in kw:
        kw |= dict(budget=name, stats=stats)
    sampled = first.temperature > 0  # then alone (plan_key)
    ids, mask = left_pad([r.prompt for r in reqs])
    try:
        sched.model.generate(
            ids.to(sched.device),
            attention_mask=mask.to(sched.device) if len(reqs) > 1 else None,
            max_new_tokens=[r.max_tokens for r in reqs],
            do_sample=sampled,
            temperature=first.temperature if sampled else 1.0,
            top_p=first.top_p if sampled else None,
            generator=first.generator if sampled else None,
            **kw,
        )
    except Exception as e:
        for i, req in enumerate(reqs):
            if not told[i]:
                req.sink(("error", f"{type(e).__name__}: {e}"))
        return
    for i, req in enumerate(reqs):
        if stats.accepted_per_row:  # a stream cut at a stop string by the app is cancelled, and reports them
            req.accepted, req.rejected = stats.accepted_per_row[i], stats.rejected_per_row[i]
        if told[i]:
            continue
        if req.cancelled:
            cancel(i)
            continue
        reason = "stop" if new[i] and new[i][-1] in eos else "length"  # an EOS ended the text
        if reason == "length" and req.stop is not None and req.stop(req.generated):
            reason = "stop"
        if reason == "length" and len(new[i]) < req.max_tokens:
            reason = "stop"
        sched._finish(req, reason)
