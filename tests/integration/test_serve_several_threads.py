"""Several-budget requests at the server, continued: sampled seeded requests of one plan run as ONE
batched call whose rows each equal in-process ``generate(seed=...)``; plain requests keep
decoding while a several-budget call runs (it has a thread of its own); each row of a batched
call gets its "done" as soon as it is finished; a server stopping during a call does not hang."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from nestlm.serve.scheduler import Request, Scheduler
from nestlm.serve.server import build_api
from nestlm.speculative import SpecStats
from tests.integration.serving import Server
from tests.integration.test_serve_several import SCHED, SPEC, TOK, admitted_together, in_process, text_of
from tests.unit.test_scheduler import solo

TEMP, TOP_P = 0.9, 0.8


@pytest.fixture
def held(model_dir: Path, one_thread):
    """A fresh server whose scheduler loop starts only at ``release()`` (as in test_serve_several)."""
    api = build_api(model_dir, max_context=256)
    start, api.scheduler.start = api.scheduler.start, lambda: None
    s = Server(api)
    yield s, start
    s.close()


def test_sampled_seeded_requests_run_as_one_call_each_equal_to_its_seed(held, model) -> None:
    spec = [("#0 the", 14, 5), ("#1 xyzw", 6, 6), ("#0 the", 14, 7), ("#0 the", 14, 5), ("#4 a b", 3, 8)]
    sched = [("t0 q", 9, 11), ("t1 zz", 16, 12), ("t1 zz", 16, 13)]
    sampling = {"do_sample": True, "temperature": TEMP, "top_p": TOP_P}
    refs = [in_process(model, p, n, budget="full", seed=s, **sampling, **SPEC) for p, n, s in spec]
    refs += [(in_process(model, p, n, budget_schedule=SCHED, seed=s, **sampling)[0], None) for p, n, s in sched]
    # teeth: the seeds matter (same prompt, other seed) and sampling is not greedy
    assert refs[0][0] == refs[3][0] and refs[0][0] != refs[2][0] and refs[6][0] != refs[7][0]
    assert refs[0][0] != in_process(model, "#0 the", 14, budget="full", **SPEC)[0]
    body = {"temperature": TEMP, "top_p": TOP_P}
    bodies = [{"prompt": p, "max_tokens": n, "seed": s, "model": "full", **body, **SPEC} for p, n, s in spec]
    bodies += [
        {"prompt": p, "max_tokens": n, "seed": s, "model": "auto", "budget_schedule": SCHED, **body}
        for p, n, s in sched
    ]
    bodies[1]["stream"] = bodies[6]["stream"] = True
    outs = admitted_together(held, bodies)
    for body, (ref, st), out in zip(bodies, refs, outs, strict=True):
        assert text_of(out) == TOK.decode(ref), body
        if st is not None and not body.get("stream"):
            assert out["usage"]["completion_tokens_details"] == {
                "accepted_prediction_tokens": sum(st.accepted_per_row),
                "rejected_prediction_tokens": sum(st.rejected_per_row),
            }, body
    snap = held[0].health()["scheduler"]
    # one call for the five speculative requests, one for the three schedules
    assert (snap["several_calls"], snap["several_rows"], snap["several_requests"]) == (2, 5, 8)


def test_batched_generate_with_one_generator_per_row_equals_each_solo_seeded_run(model) -> None:
    """The decoders themselves: generator= a list, rows with other caps (fewer drafts in a round)."""
    prompts, caps, seeds = ["#0 the", "#1 xyzwxyzw q", "ab", "a"], [14, 2, 9, 20], [5, 6, 7, 8]
    ids = torch.zeros(4, 13, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        e = TOK.encode(p)
        ids[i, 13 - len(e) :], mask[i, 13 - len(e) :] = torch.tensor(e), 1
    for kw in ({"budget": "full", **SPEC}, {"budget_schedule": SCHED, "tokenizer": TOK}):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        st = SpecStats()
        extra = {"stats": st} if "budget" in kw else {}
        sampling = dict(do_sample=True, temperature=TEMP, top_p=TOP_P)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=caps, generator=gens, **sampling, **kw, **extra)
        for i, (p, n, s) in enumerate(zip(prompts, caps, seeds, strict=True)):
            one = torch.tensor([TOK.encode(p)])
            st1 = SpecStats()
            extra1 = {"stats": st1} if "budget" in kw else {}
            ref = model.generate(one, max_new_tokens=n, seed=s, **sampling, **kw, **extra1)[0, one.shape[1] :].tolist()
            assert out[i, 13 : 13 + len(ref)].tolist() == ref, (kw, p)
            if extra:
                assert (st.accepted_per_row[i], st.rejected_per_row[i]) == (
                    st1.accepted_per_row[0],
                    st1.rejected_per_row[0],
                )
    with pytest.raises(ValueError, match="one generator per row"):
        model.generate(ids, max_new_tokens=3, do_sample=True, generator=gens[:2], budget="full", **SPEC)
    with pytest.raises(ValueError, match="on_done= and per-row"):  # plain decoding has on_step= (was a recursion)
        model.generate(ids, max_new_tokens=3, budget="full", on_done=lambda b: None)


class Log:
    """Every event of every request, in the order they arrived (from any thread)."""

    def __init__(self) -> None:
        self.events: list[tuple[int, tuple]] = []
        self.lock = threading.Lock()

    def sink(self, i: int):
        def put(ev: tuple) -> None:
            with self.lock:
                self.events.append((i, ev))

        return put

    def of(self, i: int) -> list[tuple]:
        return [ev for j, ev in self.events if j == i]

    def at(self, i: int, kind: str, last: bool = False) -> int:
        """Position in the log of request i's first (or last) event of ``kind``."""
        idx = [n for n, (j, ev) in enumerate(self.events) if j == i and ev[0] == kind]
        return idx[-1] if last else idx[0]

    def wait(self, cond, timeout: float = 120) -> None:
        t0 = time.time()
        while not cond():
            assert time.time() - t0 < timeout, "timed out"
            time.sleep(0.005)


def tokens(evs: list[tuple]) -> list[int]:
    return [ev[1] for ev in evs if ev[0] == "token"]


def done(evs: list[tuple]) -> bool:
    return bool(evs) and evs[-1][0] in ("done", "error")


def test_a_plain_request_finishes_while_a_long_several_call_runs(model, one_thread) -> None:
    long_ref = in_process(model, "a long run", 120, budget="full", **SPEC)[0]
    assert len(long_ref) == 120  # no EOS: the call runs to its max_tokens
    sched = Scheduler(model)
    log = Log()
    sched.start()
    try:
        sched.submit(Request(TOK.encode("a long run"), "full", 120, log.sink(0), several=dict(SPEC)))
        log.wait(lambda: len(tokens(log.of(0))) >= 2)
        running = sched.snapshot()["several_active"]  # the call's requests
        plain = TOK.encode("plain one")
        sched.submit(Request(plain, "50", 6, log.sink(1)))
        log.wait(lambda: done(log.of(0)) and done(log.of(1)))
    finally:
        sched.stop()
    assert log.of(1)[-1] == ("done", "length") and tokens(log.of(1)) == solo(model, plain, "50", 6)
    assert log.of(0)[-1] == ("done", "length") and tokens(log.of(0)) == long_ref
    # the plain request was answered while the several-budget call was still producing tokens
    assert log.at(1, "done") < log.at(0, "token", last=True) and running == 1
    c = sched.counters
    assert c.several_calls == 1 and c.decode_steps >= 5 and c.finished == 2


@pytest.mark.parametrize("kind", ["speculative", "schedule"])
def test_a_short_row_is_done_before_the_long_row_of_its_call_ends(model, one_thread, kind: str) -> None:
    jobs = [("short one", 3), ("long one", 40), ("middle", 12)]
    several = dict(SPEC) if kind == "speculative" else {"budget_schedule": SCHED, "tokenizer": TOK}
    ref_kw = dict(budget="full", **SPEC) if kind == "speculative" else dict(budget_schedule=SCHED)
    refs = [in_process(model, p, n, **ref_kw)[0] for p, n in jobs]
    assert len(refs[0]) == 3 and len(refs[1]) == 40  # the short row ends at its max_tokens, the long one too
    sched = Scheduler(model)  # not started: step() runs the call inline
    log = Log()
    for i, (p, n) in enumerate(jobs):
        sched.submit(Request(TOK.encode(p), "full", n, log.sink(i), several=dict(several)))
    sched.step()
    for i, ref in enumerate(refs):
        assert tokens(log.of(i)) == ref and log.of(i)[-1] == ("done", "length"), jobs[i]
        assert [ev[0] for ev in log.of(i)].count("done") == 1
    assert log.at(0, "done") < log.at(1, "token", last=True)
    assert log.at(2, "done") < log.at(1, "token", last=True)
    c = sched.counters
    assert (c.several_calls, c.several_rows, c.finished) == (1, 3, 3)


def test_stop_during_a_long_several_call_does_not_hang(model, one_thread) -> None:
    sched = Scheduler(model)
    log = Log()
    sched.start()
    sched.submit(Request(TOK.encode("a long run"), "full", 4000, log.sink(0), several=dict(SPEC)))
    sched.submit(
        Request(TOK.encode("zz"), "full", 4000, log.sink(1), several={"budget_schedule": SCHED, "tokenizer": TOK})
    )
    log.wait(lambda: len(tokens(log.of(0))) >= 2)
    t0 = time.time()
    sched.stop()
    assert time.time() - t0 < 10
    assert not sched.several.alive() and not sched._thread.is_alive()
    assert log.of(0)[-1] == ("error", "the server is shutting down")
    assert log.of(1)[-1] == ("error", "the server is shutting down")  # waiting for the runner, or in its call
