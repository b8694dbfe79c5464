"""What the scheduler keeps per request and per batch, and its counters (/health reports them)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import InferenceCache
from ..sampling import LogitShaper, Shaping

_ENDING = threading.Lock()  # a request ends once, whichever thread ends it


class QueueFull(Exception):
    """The bounded wait queue is full; the request is refused (HTTP 429)."""


@dataclass
class Request:
    """One sequence to generate. Events go to ``sink`` from the scheduler thread (the several-budget
    runner's thread for a request with ``several``):
    ("token", id, logprob_info | None), ("prompt_logprobs", list) and finally, once (:meth:`end`),
    ("done", finish_reason) or ("error", message). ``stop(generated_ids)`` -> True ends the request
    with finish_reason "stop". ``top_k``, ``min_p``, ``logit_bias`` and the penalties as
    ``model.generate`` takes them (nestlm.sampling).
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
    top_k: int | None = None
    min_p: float | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    shaping: Shaping | None = None  # set at admission, with the seed the generator took
    shaper: LogitShaper | None = None
    seed_used: int | None = None
    ended: bool = False  # the final event has been sent

    def cancel(self) -> None:
        """Called from any thread (a client that went away); the row leaves at the next step boundary."""
        self.cancelled = True

    def end(self, ev: tuple) -> bool:
        """Send the final event ("done", reason) or ("error", message), once; False if already ended."""
        with _ENDING:
            if self.ended:
                return False
            self.ended = True
        self.sink(ev)
        return True

    def fail(self, e: BaseException) -> None:
        """End this request alone with an error."""
        self.end(("error", f"{type(e).__name__}: {e}"))

    def seeded(self, device: Any) -> None:
        """(Re)create the sampling generator from the seed taken at admission."""
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(self.seed_used)


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
    max_decoding: int = 0  # the most rows decoding at once: batches and several-budget calls together
    errors: int = 0  # requests ended by an error
