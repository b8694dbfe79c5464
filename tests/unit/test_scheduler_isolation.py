"""The scheduler without HTTP, below the API's validation (defence in depth): one request's failure
(its seed, its temperature, its logit bias, its prompt, its stop check, its several-budget call)
ends that request alone with one ("error", ...) event, and every other row of its batch gets
exactly what it would have got alone. ``max_batch`` bounds every row decoding at once, several-
budget calls included; caches grow with what is generated instead of reserving max_tokens."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import nestlm
from nestlm.cache import AttentionState
from nestlm.sampling import KV_AHEAD
from nestlm.serve.scheduler import Request, Scheduler
from nestlm.serve.several import SHUTDOWN
from nestlm.speculative import SpecStats
from nestlm.tokenizer import ByteTokenizer
from tests.unit.test_scheduler import elastic_model, run_until_done, solo

TOK = ByteTokenizer()
SPEC = {"draft_budget": "75", "num_draft_tokens": 3}
SCHED = [{"budget": "50", "stop": "e", "max_tokens": 6, "force": " so:"}, {"budget": "full"}]


@pytest.fixture(scope="module")
def model(one_thread) -> nestlm.HybridLM:
    return elastic_model()


def tokens(ev: list[tuple]) -> list[int]:
    return [e[1] for e in ev if e[0] == "token"]


def finals(ev: list[tuple]) -> list[tuple]:
    return [e for e in ev if e[0] in ("done", "error")]


def raising_stop(after: int):
    """A stop check that raises once the request has ``after`` tokens (a bug in one request's code)."""

    def stop(gen: list[int]) -> bool:
        if len(gen) >= after:
            raise RuntimeError("this request's stop check broke")
        return False

    return stop


def in_process(model, prompt: list[int], n: int, **kw) -> tuple[list[int], SpecStats]:
    st = SpecStats()
    extra = {"stats": st} if "draft_budget" in kw else {"tokenizer": TOK} if "budget_schedule" in kw else {}
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, **kw, **extra)[0, len(prompt) :].tolist()
    return [t for t in out if t != 2], st


POISON = 250  # a prompt token the model's forward is made to fail on (a failure one request's input causes)


def test_bad_requests_end_alone_and_their_batch_goes_on(model, monkeypatch) -> None:
    """Every kind of failure of a plain batched row, among good rows of every budget."""
    forward = model.forward

    def poisoned(ids, *a, **kw):
        if bool((ids == POISON).any()):
            raise RuntimeError("the forward failed on this input")
        return forward(ids, *a, **kw)

    monkeypatch.setattr(model, "forward", poisoned)
    sched = Scheduler(model, max_batch=16)
    good = [(TOK.encode(f"good {i} " + "ab" * i), model.budgets[i % 3], 6 + i) for i in range(6)]
    bad = {
        "seed": dict(temperature=0.8, seed=2**64),  # Generator.manual_seed raises
        "temperature": dict(temperature=1e-40),  # the logits overflow: no distribution to draw from
        "logit_bias": dict(logit_bias={10**6: 1.0}),  # outside the vocabulary
        "penalty": dict(repetition_penalty=0.0),
        "prompt": dict(prompt=[5, 999, 7]),  # a token id outside the vocabulary
        "poison": dict(prompt=[5, POISON, 7]),  # its group's prefill fails: the others are prefilled again alone
        "stop": dict(stop=raising_stop(3)),  # fails at its 3rd token, in the decode loop
        "first": dict(stop=raising_stop(1)),  # fails at its first token, in the prefill
        "budget": dict(budget="9b"),
    }
    reqs, events = [], []
    for prompt, budget, n in good[:3]:
        events.append([])
        reqs.append(Request(prompt, budget, n, events[-1].append))
    for kw in bad.values():
        events.append([])
        kw = {"prompt": TOK.encode("bad one"), "budget": "full"} | kw
        reqs.append(Request(kw.pop("prompt"), kw.pop("budget"), 12, events[-1].append, **kw))
    for prompt, budget, n in good[3:]:
        events.append([])
        reqs.append(Request(prompt, budget, n, events[-1].append))
    for r in reqs:
        sched.submit(r)
    run_until_done(sched, events)
    goods = [0, 1, 2] + list(range(3 + len(bad), len(reqs)))
    for i, (prompt, budget, n) in zip(goods, good, strict=True):
        assert tokens(events[i]) == solo(model, prompt, budget, n), i
        assert finals(events[i]) == [events[i][-1]] and events[i][-1][0] == "done"
    for j, name in enumerate(bad):
        ev = events[3 + j]
        assert len(finals(ev)) == 1 and ev[-1][0] == "error" and ev[-1][1], (name, ev)
    assert len(tokens(events[3 + list(bad).index("stop")])) == 3  # it streamed until it broke
    assert len(tokens(events[3 + list(bad).index("first")])) == 1
    assert sched.counters.errors == len(bad) and sched.active() == 0
    assert sched.counters.multi_row_steps > 0  # the good rows were batched (with the bad ones, at first)


def test_a_failing_several_budget_call_ends_only_its_request(model) -> None:
    """A batched several-budget call that raises: each other request reruns alone and gets exactly its
    solo result, each token sent once; greedy and sampled (seeded) calls, speculative and schedules."""
    sampled = {"temperature": 0.9, "top_p": 0.8}
    for several, sampling in ((SPEC, {}), (SPEC, sampled), ({"budget_schedule": SCHED, "tokenizer": TOK}, {})):
        sched = Scheduler(model)  # not started: the calls run inline, in step()
        jobs = [("#0 the", 14, 5), ("#1 xyzw", 24, 6), ("#2 ab", 11, 7)]
        events: list[list[tuple]] = [[] for _ in jobs]
        for i, (p, n, seed) in enumerate(jobs):
            stop = raising_stop(4) if i == 1 else None
            kw = dict(seed=seed, stop=stop, several=dict(several), **sampling)
            sched.submit(Request(TOK.encode(p), "full", n, events[i].append, **kw))
        sched.step()
        kw = dict(several)
        kw.pop("tokenizer", None)
        if sampling:
            kw |= {"do_sample": True, **sampling}
        budget = {} if "budget_schedule" in kw else {"budget": "full"}
        for i, (p, n, seed) in enumerate(jobs):
            ref, _ = in_process(model, TOK.encode(p), n, seed=seed, **budget, **kw)
            if i == 1:  # streamed until its stop check broke, each token once
                assert len(finals(events[1])) == 1 and events[1][-1][0] == "error", events[1]
                got = tokens(events[1])
                assert len(got) >= 4 and got == ref[: len(got)], (several, sampling, got, ref)
                continue
            assert tokens(events[i]) == ref, (several, sampling, i)
            assert events[i][-1][0] == "done" and len(finals(events[i])) == 1
        c = sched.counters
        assert c.several_calls >= 2 and c.errors == 1  # the batched call, then each request left alone


def test_max_batch_bounds_plain_and_several_rows_together(model, monkeypatch) -> None:
    """Plain rows and several-budget calls (on the runner's thread) never exceed max_batch together."""
    sched = Scheduler(model, max_batch=2)
    generate = model.generate
    lock = threading.Lock()
    state = {"several": 0, "depth": 0, "most": 0}

    def note() -> None:
        state["most"] = max(state["most"], sched.active() + state["several"])

    def watched(ids, *a, **kw):  # the runner's calls (a schedule calls generate again per phase)
        with lock:
            state["depth"] += 1
            top = state["depth"] == 1
            if top:
                state["several"] += ids.shape[0]
                note()
        try:
            return generate(ids, *a, **kw)
        finally:
            with lock:
                state["depth"] -= 1
                if top:
                    state["several"] -= ids.shape[0]

    decode = sched._decode

    def decode_watched(name):
        with lock:
            note()
        return decode(name)

    monkeypatch.setattr(model, "generate", watched)
    monkeypatch.setattr(sched, "_decode", decode_watched)
    jobs = [(f"spec {i}", 8 + i, dict(SPEC)) for i in range(4)] + [(f"plain {i}", 10 + i, None) for i in range(4)]
    events: list[list[tuple]] = [[] for _ in jobs]
    for i, (p, n, several) in enumerate(jobs):
        sched.submit(Request(TOK.encode(p), model.budgets[i % 3], n, events[i].append, several=several))
    sched.start()
    try:
        t0 = time.time()
        while not all(ev and ev[-1][0] in ("done", "error") for ev in events):
            assert time.time() - t0 < 120, "requests did not finish"
            time.sleep(0.01)
    finally:
        sched.stop()
    monkeypatch.undo()
    for (p, n, several), ev, budget in zip(jobs, events, [model.budgets[i % 3] for i in range(8)], strict=True):
        kw = {"budget": budget} | (several or {})
        assert tokens(ev) == in_process(model, TOK.encode(p), n, **kw)[0], p
    assert 0 < state["most"] <= 2, state
    assert sched.counters.max_decoding <= 2 and sched.counters.several_calls >= 2


def test_caches_grow_with_what_is_generated(monkeypatch, one_thread) -> None:
    """A request of max_tokens 4000 (a chat request without max_tokens) reserves KV_AHEAD new tokens,
    not 4000: in the scheduler, in generate, in speculative decoding; the cache grows as it fills."""
    model = elastic_model(eos=None)
    sched = Scheduler(model)
    ev: list[tuple] = []
    sched.submit(Request([5, 6, 7, 8, 9], "full", 4000, ev.append))
    sched.step()

    def kv_len(cache) -> int:
        return max(st.k.shape[2] for st in cache.layers if isinstance(st, AttentionState))

    assert kv_len(sched.batches["full"].cache) <= 5 + KV_AHEAD
    for _ in range(150):
        sched.step()
    n = len(tokens(ev))
    assert n == 152 and 5 + n <= kv_len(sched.batches["full"].cache) <= 2 * (5 + n)
    sched.batches["full"].rows[0].cancel()
    sched.step()
    import nestlm.generate as plain
    import nestlm.speculative as spec

    for mod in (plain, spec):
        made = []
        real = mod.InferenceCache

        def record(n_layers, capacity=0, made=made, real=real):
            made.append(capacity)
            return real(n_layers, capacity=capacity)

        monkeypatch.setattr(mod, "InferenceCache", record)
        kw = SPEC if mod is spec else {}
        model.generate(
            torch.tensor([[5, 6, 7]]), max_new_tokens=4000, budget="full", stop=lambda g: g[:, -1] >= 0, **kw
        )
        assert made and max(made) <= 3 + KV_AHEAD + 3 + 2, (mod.__name__, made)


def test_every_request_gets_one_final_event_at_shutdown(one_thread) -> None:
    """A running row and a request waiting for a slot both end with the shutdown error."""
    model = elastic_model(eos=None)
    sched = Scheduler(model, max_batch=1)
    evs: list[list[tuple]] = [[], []]
    sched.submit(Request([5, 6], "full", 100_000, evs[0].append))
    sched.submit(Request([7, 8], "50", 3, evs[1].append))
    sched.start()
    t0 = time.time()
    while not tokens(evs[0]):
        assert time.time() - t0 < 60
        time.sleep(0.01)
    sched.stop()
    for ev in evs:
        assert finals(ev) == [("error", SHUTDOWN)], ev
