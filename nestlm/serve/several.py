"""Requests with several budgets in one generation (``budget_schedule``, ``draft_budget``): batched
``model.generate`` calls, streamed token by token, on a thread of their own.

Requests taken in one admission that share a decoding plan (the same budget schedule, or the
same target budget, draft budget and ``num_draft_tokens``; the same logit bias and penalties;
sampled ones also the same temperature, top_p, top_k and min_p) run as ONE ``model.generate``
call over their left-padded prompts; a plan's requests of later admissions still waiting for the
runner join the call it starts next.
Each row keeps its own ``max_tokens`` (a per-row ``max_new_tokens`` list), stop strings
(``row_stop``) and, when sampled, its own seeded generator (``generator=`` one per row: each
row draws what it would draw alone), so each result equals in-process ``generate`` of that
prompt (with its seed), and a speculative row's accepted and rejected draft counts are those of
its solo run.

Tokens go to their request's sink as the decoder produces them (its ``on_token``), and each
row's ("done", reason) as soon as the decoder has its last token (``on_done``), not at the end
of the call. Logprobs are those of the budget that chose each token: the target's when
speculative, a schedule phase's own, and ``{"logprob": 0.0, "top": []}`` for a schedule's
forced tokens (which have no logits). EOS tokens are not text (one that ends a schedule's phase
neither). A request cancelled during the call gets ("done", "cancelled") and no further event;
its row stops at its next token where the decoder allows (a schedule checks stops in its last
phase only), and a call whose requests have all been told ends at once.

A call that raises does not fail its other requests: each request not yet ended runs again alone
(a sampled one with its generator seeded afresh), its tokens already sent checked against the
solo run's and not sent twice, so it gets exactly what it would have got alone; only a request
whose solo run fails gets ("error", message).

The calls run one after another on the runner's thread (:class:`SeveralRunner`) while the
scheduler loop goes on decoding the batched rows (the weights are read-only; counters shared
with the loop change under ``Scheduler.lock``). On shutdown the running call ends at its next
token and its requests, and those still waiting for the runner, get ("error", "the server is
shutting down"). A scheduler driven by ``step()`` alone, not started, runs the calls inline.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import torch

from .batching import left_pad, logprob_info

if TYPE_CHECKING:
    from .scheduler import Request, Scheduler

SHUTDOWN = "the server is shutting down"


class _EndCall(Exception):
    """Raised from on_token to end a call early: every request has been told, or the server stops."""


def plan_key(req: Request, name: str | None) -> Hashable:
    """Requests with equal keys run as one batched call."""
    kw = req.several or {}
    sampling = (req.temperature, req.top_p, req.top_k, req.min_p) if req.temperature > 0 else None
    sampling = (sampling, req.shaping)
    if "budget_schedule" in kw:
        return "schedule", json.dumps(kw["budget_schedule"], sort_keys=True), id(kw.get("tokenizer")), sampling
    return "draft", name, kw.get("draft_budget"), kw.get("num_draft_tokens"), sampling


def run_several(sched: Scheduler, reqs: list[Request], name: str | None) -> None:
    """One ``model.generate`` call for ``reqs`` (one plan, see :func:`plan_key`) at target budget ``name``;
    if it raises, each request not yet ended runs again alone (see the module docstring)."""
    err = _call(sched, reqs, name, [0] * len(reqs))
    if err is None:
        return
    for req in reqs:
        if req.ended:
            continue
        if len(reqs) > 1 and not sched._stop:
            if req.generator is not None:
                req.seeded(req.generator.device)
            err1 = _call(sched, [req], name, [len(req.generated)])
            if err1 is None:
                continue
            err = err1
        sched._error(req, err)


def _call(sched: Scheduler, reqs: list[Request], name: str | None, sent: list[int]) -> Exception | None:
    """The batched call; None, or the exception it raised (the requests it did not end are left so).
    Row i's first ``sent[i]`` tokens were sent before: checked against the request's, not sent again."""
    from ..speculative import SpecStats

    c = sched.counters
    with sched.lock:
        c.several_calls += 1
        c.several_requests += len(reqs)
        c.several_rows = max(c.several_rows, len(reqs))
        c.prefills += len(reqs)
    eos = sched.eos_ids
    stats = SpecStats()
    new: list[list[int]] = [[] for _ in reqs]  # every token of each row, EOS included
    seen = [0] * len(reqs)  # tokens of each row that were text (as sent)

    def counts(i: int) -> None:  # final once the row is done: set before its "done" is sent
        if stats.accepted_per_row:  # a stream cut at a stop string by the app is cancelled, and reports them
            reqs[i].accepted, reqs[i].rejected = stats.accepted_per_row[i], stats.rejected_per_row[i]

    def cancel(i: int) -> None:
        counts(i)
        if reqs[i].end(("done", "cancelled")):
            with sched.lock:
                c.cancelled += 1

    def finish(i: int) -> None:
        req = reqs[i]
        if req.cancelled:
            cancel(i)
            return
        counts(i)
        reason = "stop" if new[i] and new[i][-1] in eos else "length"  # an EOS ended the text
        if reason == "length" and req.stop is not None and req.stop(req.generated):
            reason = "stop"
        if reason == "length" and len(new[i]) < req.max_tokens:
            reason = "stop"
        sched._finish(req, reason)

    def on_done(i: int) -> None:
        if not reqs[i].ended:
            finish(i)
        if all(r.ended for r in reqs):  # nobody listens any more (the rows left are cancelled ones)
            raise _EndCall

    def on_token(i: int, tok: int, logits: torch.Tensor | None, _budget: str | None = None) -> None:
        if sched._stop:
            raise _EndCall
        new[i].append(tok)
        req = reqs[i]
        if not req.ended and req.cancelled:
            cancel(i)
        if all(r.ended for r in reqs):
            raise _EndCall
        if req.ended or tok in eos:
            return
        seen[i] += 1
        if seen[i] <= sent[i]:  # a solo rerun: this token was sent by the batched call
            if req.generated[seen[i] - 1] != tok:
                raise RuntimeError("the request's run alone differs from what its batched call sent")
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
    kw: dict[str, Any] = dict(first.several or {}, on_token=on_token, row_stop=row_stop, on_done=on_done)
    if "budget_schedule" not in kw:
        kw |= dict(budget=name, stats=stats)
    sampled = first.temperature > 0  # then every request of the call samples alike (plan_key)
    if sampled:
        kw |= dict(temperature=first.temperature, top_p=first.top_p, top_k=first.top_k, min_p=first.min_p)
    sh = first.shaping  # the same for every request of the call (plan_key)
    if sh is not None:
        kw |= dict(logit_bias=dict(sh.logit_bias), presence_penalty=sh.presence_penalty)
        kw |= dict(frequency_penalty=sh.frequency_penalty, repetition_penalty=sh.repetition_penalty)
    ids, mask = left_pad([r.prompt for r in reqs])
    try:
        sched.model.generate(
            ids.to(sched.device),
            attention_mask=mask.to(sched.device) if len(reqs) > 1 else None,
            max_new_tokens=[r.max_tokens for r in reqs],
            do_sample=sampled,
            generator=[r.generator for r in reqs] if sampled else None,
            **kw,
        )
    except _EndCall:
        pass
    except Exception as e:
        return e
    for req in reqs:
        if not req.ended:
            if sched._stop:
                req.end(("error", SHUTDOWN))
            else:  # a row the decoder did not report (none expected)
                finish(reqs.index(req))
    return None


class SeveralRunner:
    """The thread that runs the several-budget calls one after another (see the module docstring)."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.cond = threading.Condition()
        self.jobs: list[tuple[Hashable, str | None, list[Request]]] = []  # (plan key, target budget, requests)
        self.running: list[Request] = []
        self.thread: threading.Thread | None = None
        self.stopping = False

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def pending(self) -> int:
        """Requests waiting for the runner (not yet in a call)."""
        with self.cond:
            return sum(len(j[2]) for j in self.jobs)

    def rows(self) -> int:
        """Rows of the running call and of the calls waiting: they hold batch slots (max_batch)."""
        with self.cond:
            return sum(len(j[2]) for j in self.jobs) + len(self.running)

    def put(self, key: Hashable, name: str | None, reqs: list[Request]) -> None:
        with self.cond:
            if not self.stopping:
                self.jobs.append((key, name, reqs))
                self.cond.notify()
                return
        for r in reqs:  # admitted while the server stops
            r.end(("error", SHUTDOWN))

    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="nestlm-several", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 30) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=timeout)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.jobs:
                    self.cond.wait()
                if self.stopping:
                    break
                key, name, reqs = self.jobs.pop(0)
                rest = []  # the plan's requests of later admissions join this call, up to max_batch rows
                for job in self.jobs:
                    if job[:2] == (key, name) and len(reqs) + len(job[2]) <= self.sched.max_batch:
                        reqs = reqs + job[2]
                    else:
                        rest.append(job)
                self.jobs, self.running = rest, reqs
            try:
                with torch.inference_mode():
                    run_several(self.sched, reqs, name)
            except Exception as e:  # run_several tells its requests of errors; this is a bug: fail them
                for r in reqs:
                    self.sched._error(r, e)
            finally:
                with self.cond:
                    self.running = []
                with self.sched.cond:  # its slots are free: the scheduler may admit again
                    self.sched.cond.notify_all()
        with self.cond:
            jobs, self.jobs = self.jobs, []
        for _, _, reqs in jobs:
            for r in reqs:
                r.end(("error", SHUTDOWN))
