"""Continuous batching over the budgets of one set of weights.

One model in memory; every budget runs as ``model(..., arch=spec)`` on views of its weights
(no per-budget copy, no reload on switch). The scheduler thread loops over step boundaries:

1. admit waiting requests while there are free slots: those of one budget are prefilled
   together as a left-padded batch (as ``model.generate`` takes one: padding never reaches
   the keys or the Mamba state), their first tokens chosen, and their cache rows joined to
   the running batch of their budget;
2. run one decode step of every budget that has rows (round robin, the starting budget
   rotating each loop, so no budget starves), all rows of a budget in one forward;
3. drop rows that finished (EOS, max_tokens, a stop string) or whose client went away.

Rows of one batch have different context lengths. Their KV caches are right-aligned (left
padding) with a key mask of real tokens, the layout ``model.generate`` uses for a
left-padded batch, so each row attends only to its own tokens and rotary positions count
real tokens only; the Mamba state of a row is its own. Greedy output of each request equals
``model.generate`` of that prompt alone, token for token.

Requests with several budgets in one generation (``budget_schedule``, ``draft_budget``) do not
join these batches: at admission, those that share a decoding plan go as one batched
``model.generate`` call (each sampled row with its own seeded generator) to the several-budget
runner's thread, which runs such calls one after another, their tokens streamed as they come,
while this loop goes on decoding the batched rows; see :mod:`nestlm.serve.several`.

``auto`` requests get the largest budget whose recent per-token latency (time between two
decode steps of that budget's batch, measured over the last ``window_s`` seconds) meets the
latency target; see :class:`LatencyTracker`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import InferenceCache
from ..generate import generation_defaults, sample_next
from .batching import LatencyTracker, _row_caches_join, _trim_left, left_pad, logprob_info
from .several import SHUTDOWN, SeveralRunner, plan_key, run_several


class QueueFull(Exception):
    """The bounded wait queue is full; the request is refused (HTTP 429)."""


@dataclass
class Request:
    """One sequence to generate. Events go to ``sink`` from the scheduler thread (the several-budget
    runner's thread for a request with ``several``):
    ("token", id, logprob_info | None), ("prompt_logprobs", list) and finally ("done", finish_reason)
    or ("error", message). ``stop(generated_ids)`` -> True ends the request with finish_reason "stop".
    """

    prompt: list[int]
    budget: str | None  # a budget name, "auto", or None (a plain model)
    max_tokens: int
    sink: Callable[[tuple], None]
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives per token (0..20), None: no logprobs
    echo_logprobs: bool = False  # also the prompt tokens' logprobs (the first one is None)
    stop: Callable[[list[int]], bool] | None = None
    cancelled: bool = False
    chosen: str | None = None  # the budget that answers (set at admission for "auto")
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Several budgets in one generation: generate's budget_schedule= (with tokenizer=) or
    # draft_budget= / num_draft_tokens=. Those of one admission sharing a plan run as one batched
    # generate call on the several-budget runner's thread (nestlm.serve.several).
    several: dict[str, Any] | None = None
    accepted: int = 0  # speculative decoding: draft tokens accepted / rejected (usage)
    rejected: int = 0

    def cancel(self) -> None:
        """Called from any thread (a client that went away); the row leaves at the next step boundary."""
        self.cancelled = True


@dataclass
class _Batch:
    """The running rows of one budget: their requests, one shared cache, their last tokens."""

    spec: Any
    rows: list[Request] = field(default_factory=list)
    cache: InferenceCache | None = None
    last: torch.Tensor | None = None  # (B,) the token each row feeds next
    last_step: float = 0.0


# ------------------------------------------------------------------ scheduler
@dataclass
class Counters:
    """What the scheduler did; /health reports these."""

    prefills: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sum over decode steps of the rows in the step
    multi_row_steps: int = 0  # decode steps that ran more than one request at once
    max_rows: int = 0
    finished: int = 0
    cancelled: int = 0
    steps_per_budget: dict[str, int] = field(default_factory=dict)
    auto_choices: dict[str, int] = field(default_factory=dict)
    several_calls: int = 0  # model.generate calls for requests with a budget schedule or a draft
    several_requests: int = 0  # requests those calls answered
    several_rows: int = 0  # the most requests in one such call


class Scheduler:
    """Continuous batching per budget over one model; ``submit`` from any thread, ``start`` runs the loop."""

    def __init__(
        self,
        model: Any,
        max_batch: int = 32,
        max_queue: int = 256,
        target_latency_ms: float = 100.0,
        window_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        self.max_queue = max_queue
        cfg = model.config
        defaults = generation_defaults(model)
        eos = defaults.get("eos_token_id", cfg.eos_token_id)
        self.eos_ids = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
        self.specs: dict[str | None, Any] = {b: model.budget(b).arch for b in model.budgets} or {None: None}
        sizes = {b: model.num_parameters(budget=b) for b in model.budgets}
        self.latency = LatencyTracker(sizes, target_latency_ms, window_s, clock) if sizes else None
        self.batches: dict[str | None, _Batch] = {b: _Batch(spec) for b, spec in self.specs.items()}
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.counters = Counters()
        self.lock = threading.Lock()  # counters the several-budget runner's thread changes too
        self.several = SeveralRunner(self)
        self._rr = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------- interface
    def submit(self, req: Request) -> None:
        with self.cond:
            if len(self.waiting) + self.several.pending() >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests); retry later")
            self.waiting.append(req)
            self.cond.notify()

    def active(self) -> int:
        """Requests holding a batch slot now."""
        return sum(len(b.rows) for b in self.batches.values())

    def snapshot(self) -> dict[str, Any]:
        c = self.counters
        return {
            "active": self.active(),
            "queued": len(self.waiting) + self.several.pending(),  # pending: admitted, waiting for the runner
            "several_active": len(self.several.running),  # requests in the several-budget call running now
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "prefills": c.prefills,
            "decode_steps": c.decode_steps,
            "decode_rows": c.decode_rows,
            "multi_row_steps": c.multi_row_steps,
            "max_rows": c.max_rows,
            "finished": c.finished,
            "cancelled": c.cancelled,
            "steps_per_budget": dict(c.steps_per_budget),
            "auto_choices": dict(c.auto_choices),
            "several_calls": c.several_calls,
            "several_requests": c.several_requests,
            "several_rows": c.several_rows,
        }

    def start(self) -> None:
        self._stop = False
        self.several.start()
        self._thread = threading.Thread(target=self._loop, name="nestlm-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop both threads: the running decode step and several-budget call end at their next token."""
        with self.cond:
            self._stop = True
            self.cond.notify()
        self.several.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._stop and not self.waiting and self.active() == 0:
                    self.cond.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # a bug must not hang every client: fail what is running, keep serving
                for b in self.batches.values():
                    for r in b.rows:
                        r.sink(("error", f"internal error: {type(e).__name__}: {e}"))
                    b.rows, b.cache, b.last = [], None, None
        for b in self.batches.values():
            for r in b.rows:
                r.sink(("error", SHUTDOWN))

    @torch.inference_mode()
    def step(self) -> None:
        """One step boundary: admit what fits, then one decode step per budget with rows."""
        self._admit()
        names = [b for b, batch in self.batches.items() if batch.rows]
        if not names:
            return
        k = self._rr % len(names)
        self._rr += 1
        for b in names[k:] + names[:k]:
            self._decode(b)

    def _admit(self) -> None:
        """Take waiting requests into free slots; prefill those of one budget together. Requests with
        several budgets go to the several-budget runner, one batched generate call per plan
        (nestlm.serve.several); a scheduler that was not started runs those calls here, first."""
        free = self.max_batch - self.active()
        taken: list[Request] = []
        with self.cond:
            while self.waiting and len(taken) < free:
                taken.append(self.waiting.popleft())
        groups: dict[str | None, list[Request]] = {}
        several: dict[Any, tuple[str | None, list[Request]]] = {}
        for req in taken:
            if req.cancelled:
                with self.lock:
                    self.counters.cancelled += 1
                req.sink(("done", "cancelled"))
                continue
            name = req.budget
            if name == "auto":  # the load it joins: rows decoding now, those admitted before it, itself
                load = self.active() + sum(len(g) for g in groups.values()) + 1
                name = self.latency.choose(load) if self.latency is not None else None
                self.counters.auto_choices[name] = self.counters.auto_choices.get(name, 0) + 1
            req.chosen = name
            if req.temperature > 0:
                req.generator = torch.Generator(device=self.device)
                seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, ()).item())
                req.generator.manual_seed(seed)
            if req.several is not None:  # one generate call per plan, on the runner's thread
                several.setdefault(plan_key(req, name), (name, []))[1].append(req)
                continue
            # echo needs every position's logits: such a request is prefilled alone
            groups.setdefault((name, id(req)) if req.echo_logprobs else name, []).append(req)
        for key, (name, reqs) in several.items():
            if self.several.alive():
                self.several.put(key, name, reqs)
            else:
                run_several(self, reqs, name)
        for key, reqs in groups.items():
            try:
                self._prefill(key[0] if isinstance(key, tuple) else key, reqs)
            except Exception as e:
                for req in reqs:
                    req.sink(("error", f"internal error: {type(e).__name__}: {e}"))

    def _prefill(self, name: str | None, reqs: list[Request]) -> None:
        """One forward over the prompts of ``reqs`` (left-padded, as ``model.generate`` takes a batch),
        their first tokens, and their cache rows joined to the running batch of budget ``name``."""
        batch = self.batches[name]
        ids, mask = left_pad([r.prompt for r in reqs])
        L = ids.shape[1]
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = InferenceCache(self.model.config.n_layers, capacity=L + max(r.max_tokens for r in reqs))
        echo = len(reqs) == 1 and reqs[0].echo_logprobs
        out = self.model(
            ids,
            arch=batch.spec,
            cache=cache,
            attention_mask=mask if len(reqs) > 1 else None,
            num_logits=None if echo else 1,
        )
        with self.lock:
            self.counters.prefills += len(reqs)
        if echo:
            req = reqs[0]
            lp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)  # (L-1, V): logits of tokens 1..L-1
            info: list[Any] = [None]
            for j, tok in enumerate(req.prompt[1:]):
                info.append(logprob_info(lp[j], tok, req.logprobs or 0))
            req.sink(("prompt_logprobs", info))
        logits = out.logits[:, -1]  # (B, V)
        keep, toks = [], []
        for i, req in enumerate(reqs):
            if req.max_tokens == 0:  # echo only (scoring a prompt)
                self._finish(req, "length")
                continue
            tok = self._sample(req, logits[i])
            if not self._emit(req, tok, logits[i]):
                keep.append(i)
                toks.append(tok)
        if not keep:
            return
        if len(keep) < len(reqs):
            cache.reorder(torch.tensor(keep, device=self.device))
            _trim_left(cache)
        last = torch.tensor(toks, device=self.device)
        if batch.cache is None:
            batch.cache, batch.rows, batch.last = cache, [reqs[i] for i in keep], last
        else:
            batch.cache = _row_caches_join(batch.cache, cache)
            batch.rows += [reqs[i] for i in keep]
            batch.last = torch.cat([batch.last, last])
        batch.last_step = time.monotonic()

    def _decode(self, name: str | None) -> None:
        batch = self.batches[name]
        self._drop(batch, [i for i, r in enumerate(batch.rows) if r.cancelled], cancelled=True)
        if not batch.rows:
            return
        n = len(batch.rows)
        out = self.model(batch.last[:, None], arch=batch.spec, cache=batch.cache, num_logits=1)
        logits = out.logits[:, -1]  # (B, V)
        c = self.counters
        c.decode_steps += 1
        c.decode_rows += n
        c.max_rows = max(c.max_rows, n)
        c.multi_row_steps += n > 1
        c.steps_per_budget[str(name)] = c.steps_per_budget.get(str(name), 0) + 1
        now = time.monotonic()
        if self.latency is not None and name is not None:
            self.latency.record(name, now - batch.last_step, self.active())
        batch.last_step = now
        greedy = logits.argmax(dim=-1).tolist()
        done = []
        nxt = []
        for i, req in enumerate(batch.rows):
            tok = greedy[i] if req.temperature <= 0 else self._sample(req, logits[i])
            nxt.append(tok)
            if self._emit(req, tok, logits[i]):
                done.append(i)
        batch.last = torch.tensor(nxt, device=self.device)
        self._drop(batch, done)

    def _drop(self, batch: _Batch, index: list[int], cancelled: bool = False) -> None:
        if not index:
            return
        for i in index:
            if cancelled:
                with self.lock:
                    self.counters.cancelled += 1
                batch.rows[i].sink(("done", "cancelled"))
        keep = [i for i in range(len(batch.rows)) if i not in set(index)]
        if not keep:
            batch.rows, batch.cache, batch.last = [], None, None
            return
        idx = torch.tensor(keep, device=self.device)
        batch.cache.reorder(idx)
        _trim_left(batch.cache)
        batch.rows = [batch.rows[i] for i in keep]
        batch.last = batch.last[idx]

    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        """The next token of one row from its logits (V,): greedy, or the request's own sampler."""
        if req.temperature <= 0:
            return int(logits.argmax())
        return int(sample_next(logits[None], True, req.temperature, None, req.top_p, req.generator)[0])

    def _emit(self, req: Request, tok: int, logits: torch.Tensor) -> bool:
        """Send one token; True when the request finished with it (and has been told so)."""
        if tok in self.eos_ids:  # the EOS token ends the text and is not part of it
            self._finish(req, "stop")
            return True
        info = None
        if req.logprobs is not None:
            info = logprob_info(torch.log_softmax(logits.float(), dim=-1), tok, req.logprobs)
        req.generated.append(tok)
        req.sink(("token", tok, info))
        if req.stop is not None and req.stop(req.generated):
            self._finish(req, "stop")
            return True
        if len(req.generated) >= req.max_tokens:
            self._finish(req, "length")
            return True
        return False

    def _finish(self, req: Request, reason: str) -> None:
        with self.lock:
            self.counters.finished += 1
        req.sink(("done", reason))
