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

``max_batch`` bounds every row that decodes at once: the rows of the batches and those of the
several-budget calls (running, or admitted and waiting for the runner) together. A cache starts
with room for the prompt and a few new tokens and grows with what is generated
(nestlm.sampling.kv_capacity), whatever ``max_tokens`` says.

One request's failure is its own: an exception in its admission (its seed, its settings), its
sampling or its stop check ends that request alone with ("error", message); the other rows of its
batch go on. A prefill that fails for a group is run again for each request alone, so only the
request that fails alone gets the error (a several-budget call likewise; see
nestlm.serve.several). Every request gets exactly one final event, also at shutdown.

``auto`` requests get the largest budget whose recent per-token latency (time between two
decode steps of that budget's batch, measured over the last ``window_s`` seconds) meets the
latency target; see :class:`LatencyTracker`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..cache import InferenceCache
from ..generate import generation_defaults, sample_next
from ..sampling import LogitShaper, Shaping, kv_capacity
from .batching import LatencyTracker, _row_caches_join, _trim_left, left_pad, logprob_info
from .request import Counters, QueueFull, Request, _Batch
from .several import SHUTDOWN, SeveralRunner, plan_key, run_several


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
        self._admitting: list[Request] = []
        self.device = next(model.parameters()).device
        self.vocab = cfg.vocab_size

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

    def decoding(self) -> int:
        """Rows decoding now, or admitted to: the batches' and the several-budget calls' (max_batch bounds it)."""
        return self.active() + self.several.rows()

    def dead(self) -> bool:
        """The loop was started and is gone: nothing will answer a request any more."""
        return self._thread is not None and not self._thread.is_alive() and not self._stop

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
            "max_decoding": c.max_decoding,
            "errors": c.errors,
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
            with self.cond:  # (a several-budget call that ends notifies: its slots are free again)
                while not self._stop and self.active() == 0 and (not self.waiting or self._free() <= 0):
                    self.cond.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception as e:  # a bug must not hang any client: fail what it touched, keep serving
                for b in self.batches.values():
                    self._fail_rows(b, e)
                for r in self._admitting:
                    self._error(r, e)
                self._admitting = []
        with self.cond:
            left, self.waiting = list(self.waiting), deque()
        for r in [r for b in self.batches.values() for r in b.rows] + left:
            r.end(("error", SHUTDOWN))

    def _free(self) -> int:
        return self.max_batch - self.decoding()

    def _fail_rows(self, batch: _Batch, e: BaseException) -> None:
        """End every row of ``batch`` with an error (its forward failed) and empty it."""
        for r in batch.rows:
            self._error(r, e)
        batch.rows, batch.cache, batch.last = [], None, None

    def _error(self, req: Request, e: BaseException) -> None:
        if not req.ended:
            with self.lock:
                self.counters.errors += 1
            req.fail(e)

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
            try:
                self._decode(b)
            except Exception as e:  # the forward of this budget's batch failed: its rows, not the others
                self._fail_rows(self.batches[b], e)

    def _admit(self) -> None:
        """Take waiting requests into free slots; prefill those of one budget together. Requests with
        several budgets go to the several-budget runner, one batched generate call per plan
        (nestlm.serve.several); a scheduler that was not started runs those calls here, first.
        A request that cannot start (its seed, its settings) ends alone with an error."""
        taken: list[Request] = []
        with self.cond:
            free = self._free()
            while self.waiting and len(taken) < free:
                taken.append(self.waiting.popleft())
        self._admitting = taken
        groups: dict[Any, list[Request]] = {}
        several: dict[Any, tuple[str | None, list[Request]]] = {}
        for req in taken:
            if req.cancelled:
                with self.lock:
                    self.counters.cancelled += 1
                req.end(("done", "cancelled"))
                continue
            try:
                name = self._start(req, sum(len(g) for g in groups.values()))
                if req.several is not None:  # one generate call per plan, on the runner's thread
                    several.setdefault(plan_key(req, name), (name, []))[1].append(req)
                    continue
            except Exception as e:
                self._error(req, e)
                continue
            # echo needs every position's logits: such a request is prefilled alone
            groups.setdefault((name, id(req)) if req.echo_logprobs else name, []).append(req)
        for key, (name, reqs) in several.items():
            if self.several.alive():
                self.several.put(key, name, reqs)
            else:
                run_several(self, reqs, name)
        self._admitting = [r for g in groups.values() for r in g]  # the runner answers the others
        rows = self.decoding() + sum(map(len, groups.values()))
        with self.lock:
            self.counters.max_decoding = max(self.counters.max_decoding, rows)
        for key, reqs in groups.items():
            self._prefill_apart(key[0] if isinstance(key, tuple) else key, reqs)
        self._admitting = []

    def _start(self, req: Request, joining: int) -> str | None:
        """Check a request and set it up: its budget (``auto`` chosen for the load it joins), its
        seeded generator, its logit shaping. Raises what makes it unable to run."""
        if not req.prompt or not all(isinstance(t, int) and 0 <= t < self.vocab for t in req.prompt):
            raise ValueError(f"the prompt must be token ids in [0, {self.vocab})")
        name = req.budget
        if name == "auto":  # the load it joins: rows decoding now, those admitted before it, itself
            name = self.latency.choose(self.active() + joining + 1) if self.latency is not None else None
        if name not in self.specs:
            raise ValueError(f"unknown budget {name!r}")
        req.shaping = Shaping.of(req.logit_bias, req.presence_penalty, req.frequency_penalty, req.repetition_penalty)
        if req.temperature > 0:
            seed = req.seed if req.seed is not None else int(torch.randint(0, 2**62, ()).item())
            req.seed_used = seed
            req.seeded(self.device)  # a seed outside the generator's range raises here, for this request
        if req.budget == "auto":
            self.counters.auto_choices[name] = self.counters.auto_choices.get(name, 0) + 1
        req.chosen = name
        return name

    def _prefill_apart(self, name: str | None, reqs: list[Request]) -> None:
        """Prefill ``reqs`` together; if that fails, each one that has not started yet alone, so that
        only a request that fails alone gets the error."""
        try:
            self._prefill(name, reqs)
        except Exception as e:
            for r in reqs:
                if len(reqs) > 1 and not r.ended and not r.generated:
                    self._prefill_apart(name, [r])
                else:
                    self._error(r, e)

    def _prefill(self, name: str | None, reqs: list[Request]) -> None:
        """One forward over the prompts of ``reqs`` (left-padded, as ``model.generate`` takes a batch),
        their first tokens, and their cache rows joined to the running batch of budget ``name``."""
        batch = self.batches[name]
        ids, mask = left_pad([r.prompt for r in reqs])
        L = ids.shape[1]
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = InferenceCache(self.model.config.n_layers, capacity=kv_capacity(L, max(r.max_tokens for r in reqs)))
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
            try:
                tok = self._sample(req, logits[i])
                if self._emit(req, tok, logits[i]):
                    continue
            except Exception as e:  # this request's sampling or stop check: it alone ends
                self._error(req, e)
                continue
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
            try:
                plain = req.temperature <= 0 and req.shaping is None
                tok = greedy[i] if plain else self._sample(req, logits[i])
                finished = self._emit(req, tok, logits[i])
            except Exception as e:  # this row's sampling or stop check failed: it alone leaves
                self._error(req, e)
                tok, finished = 0, True
            nxt.append(tok)
            if finished:
                done.append(i)
        batch.last = torch.tensor(nxt, device=self.device)
        self._drop(batch, done)

    def _drop(self, batch: _Batch, index: list[int], cancelled: bool = False) -> None:
        if not index:
            return
        for i in index:
            if cancelled and batch.rows[i].end(("done", "cancelled")):
                with self.lock:
                    self.counters.cancelled += 1
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
        """The next token of one row from its logits (V,): its logit shaping, then greedy or its own sampler."""
        x = logits[None]
        if req.shaping is not None:
            if req.shaper is None:
                req.shaper = LogitShaper(req.shaping, [req.prompt], [len(req.prompt)], x.shape[-1], x.device)
            x = req.shaper(x)
        if req.temperature <= 0:
            return int(x.argmax())
        return int(sample_next(x, True, req.temperature, req.top_k, req.top_p, req.generator, req.min_p)[0])

    def _emit(self, req: Request, tok: int, logits: torch.Tensor) -> bool:
        """Send one token; True when the request finished with it (and has been told so)."""
        if tok in self.eos_ids:  # the EOS token ends the text and is not part of it
            self._finish(req, "stop")
            return True
        info = None
        if req.logprobs is not None:
            info = logprob_info(torch.log_softmax(logits.float(), dim=-1), tok, req.logprobs)
        req.generated.append(tok)
        if req.shaper is not None:
            req.shaper.add_row(0, [tok])
        req.sink(("token", tok, info))
        if req.stop is not None and req.stop(req.generated):
            self._finish(req, "stop")
            return True
        if len(req.generated) >= req.max_tokens:
            self._finish(req, "length")
            return True
        return False

    def _finish(self, req: Request, reason: str) -> None:
        if req.end(("done", reason)):
            with self.lock:
                self.counters.finished += 1
