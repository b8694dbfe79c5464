"""Operating the server: one access-log line per generation request, and Prometheus metrics at ``/metrics``.

Each request to ``/v1/completions`` or ``/v1/chat/completions`` ends in one :class:`Record` that
:meth:`Metrics.done` turns into one line of the ``nestlm.serve.access`` logger (the budget that
answered, the prompt and generated token counts, the latency, the HTTP status; the prompt itself
only when the server was started with ``--log-prompts``) and into the counters below. Metrics
live in a registry of their own, one per served model (never the process-wide default).

  nestlm_requests_total{budget, status}          requests answered, by budget and HTTP status
  nestlm_prompt_tokens_total{budget}              prompt tokens of the requests that reached the model
  nestlm_generation_tokens_total{budget}          tokens generated for them
  nestlm_request_latency_seconds{budget}          histogram: request arrival to last byte of the answer
  nestlm_queue_length                             requests waiting for a batch slot (read at scrape time)
  nestlm_running_batch_size{budget}               rows decoding now, per budget (read at scrape time)

``budget`` is the budget that answered (the one ``auto`` chose), the served name of a plain model,
the requested name when the request failed before running, or ``-`` when it named no model this
server has (unknown names would make one label value per typo).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .scheduler import Scheduler

ACCESS_LOG = logging.getLogger("nestlm.serve.access")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, float("inf"))
NO_BUDGET = "-"


@dataclass
class Record:
    """What one generation request did; filled in as it runs, logged and counted once at its end."""

    route: str
    client: str = "-"
    t0: float = field(default_factory=time.perf_counter)
    model: str = NO_BUDGET  # as requested ("auto", a budget name), or "-" when the request named none we have
    budget: str = NO_BUDGET  # the budget that answered
    status: int = 200
    prompt_tokens: int = 0  # counted once the request reached the scheduler
    completion_tokens: int = 0
    finish: str = "-"
    error: str | None = None  # the OpenAI error code of a refused or failed request
    prompt: Any = None  # the request's prompt or messages: logged only with --log-prompts
    stream: bool = False
    ended: bool = False


class _SchedulerCollector(Collector):
    """Gauges read from the scheduler when /metrics is scraped."""

    def __init__(self, scheduler: Scheduler, names: dict[str | None, str]) -> None:
        self.sched, self.names = scheduler, names

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.sched
        q = GaugeMetricFamily("nestlm_queue_length", "requests waiting for a batch slot")
        q.add_metric([], len(s.waiting) + s.several.pending())
        yield q
        rows = {name: len(b.rows) for name, b in s.batches.items()}
        with s.several.cond:
            running = list(s.several.running)
        for r in running:  # rows of the several-budget call running now, by the budget that answers them
            rows[r.chosen] = rows.get(r.chosen, 0) + 1
        g = GaugeMetricFamily("nestlm_running_batch_size", "rows decoding now, per budget", labels=["budget"])
        for name, n in rows.items():
            g.add_metric([self.names.get(name, str(name))], n)
        yield g


class Metrics:
    """The server's counters and its access log."""

    def __init__(self, scheduler: Scheduler, ids: list[str], plain_name: str | None, log_prompts: bool = False) -> None:
        self.ids = list(ids)
        self.log_prompts = log_prompts
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nestlm_requests", "generation requests answered", ["budget", "status"], registry=r)
        self.prompt_tokens = Counter("nestlm_prompt_tokens", "prompt tokens of requests run", ["budget"], registry=r)
        self.generation_tokens = Counter("nestlm_generation_tokens", "tokens generated", ["budget"], registry=r)
        self.latency = Histogram(
            "nestlm_request_latency_seconds",
            "time from a request's arrival to the end of its answer",
            ["budget"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for b in self.ids:  # every budget's series exists from the start, at 0
            self.prompt_tokens.labels(b)
            self.generation_tokens.labels(b)
            self.latency.labels(b)
        names = {None: plain_name} if plain_name is not None else {}
        r.register(_SchedulerCollector(scheduler, names))

    def label(self, model: Any) -> str:
        """A requested model as a label value: a name this server has, "auto", or "-"."""
        return model if isinstance(model, str) and (model in self.ids or model == "auto") else NO_BUDGET

    def done(self, rec: Record) -> None:
        """Count and log a finished request (once, whatever calls it again)."""
        if rec.ended:
            return
        rec.ended = True
        latency = time.perf_counter() - rec.t0
        budget = rec.budget if rec.budget != NO_BUDGET else rec.model
        self.requests.labels(budget, str(rec.status)).inc()
        if rec.prompt_tokens or rec.completion_tokens:
            self.prompt_tokens.labels(budget).inc(rec.prompt_tokens)
            self.generation_tokens.labels(budget).inc(rec.completion_tokens)
        self.latency.labels(budget).observe(latency)
        ACCESS_LOG.info(self.line(rec, budget, latency))

    def line(self, rec: Record, budget: str, latency: float) -> str:
        """``client "POST /v1/completions" status budget=.. model=.. prompt_tokens=.. ...`` (prompt last, if logged)."""
        parts = [
            f'{rec.client} "POST {rec.route}" {rec.status}',
            f"budget={budget}",
            f"model={rec.model}",
            f"prompt_tokens={rec.prompt_tokens}",
            f"completion_tokens={rec.completion_tokens}",
            f"latency_ms={1000 * latency:.1f}",
            f"finish={rec.finish}",
        ]
        if rec.stream:
            parts.append("stream=true")
        if rec.error:
            parts.append(f"error={rec.error}")
        if self.log_prompts and rec.prompt is not None:
            parts.append("prompt=" + json.dumps(rec.prompt, ensure_ascii=False))  # one line: newlines escaped
        return " ".join(parts)

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text format of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
