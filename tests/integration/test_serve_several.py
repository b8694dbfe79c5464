"""The server's extra fields budget_schedule, draft_budget and num_draft_tokens: each result equals
in-process ``model.generate``, under concurrency; greedy requests of one admission that share a
plan run as one batched call (the scheduler's counters show it), their tokens streamed as they
come; usage reports each request's own accepted / rejected prediction tokens; logprobs are the
target's; a schedule with a ``model`` outside its budgets is a 400."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from nestlm.serve.scheduler import Request, Scheduler
from nestlm.serve.server import build_api
from nestlm.speculative import SpecStats
from nestlm.tokenizer import ByteTokenizer
from tests.integration.serving import Server

TOK = ByteTokenizer()
EOS = 2
SCHED = [{"budget": "50", "stop": "e", "max_tokens": 6, "force": " so:"}, {"budget": "full"}]


def in_process(model, prompt: str, n: int, **kw) -> tuple[list[int], SpecStats]:
    ids = torch.tensor([TOK.encode(prompt)])
    st = SpecStats()
    extra = {"stats": st} if "draft_budget" in kw else {"tokenizer": TOK}
    out = model.generate(ids, max_new_tokens=n, **kw, **extra)[0, ids.shape[1] :].tolist()
    return [t for t in out if t != EOS], st  # the server returns no EOS token as text


def post(server: Server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/completions", json=body, timeout=120)


def test_concurrent_mix_equals_in_process(server: Server, model) -> None:
    jobs = []
    for i in range(12):
        prompt, n = f"#{i} {'xyzw' * (i % 3)}", 10 + i % 5
        kind = ("plain", "schedule", "speculative")[i % 3]
        jobs.append((prompt, n, kind))
    start = threading.Barrier(len(jobs))

    def body(prompt: str, n: int, kind: str) -> dict:
        b = {"prompt": prompt, "max_tokens": n, "temperature": 0, "model": "full"}
        if kind == "schedule":
            b |= {"budget_schedule": SCHED, "model": "auto"}
        elif kind == "speculative":
            b |= {"draft_budget": "75", "num_draft_tokens": 3, "logprobs": 2}
        return b

    def one(job):
        start.wait()
        return post(server, body(*job))

    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(one, jobs))
    spec_seen = 0
    for (prompt, n, kind), r in zip(jobs, results, strict=True):
        assert r.status_code == 200, r.text
        out = r.json()
        if kind == "plain":
            ref, _ = in_process(model, prompt, n, budget="full")
        elif kind == "schedule":
            ref, _ = in_process(model, prompt, n, budget_schedule=SCHED)
        else:
            ref, st = in_process(model, prompt, n, budget="full", draft_budget="75", num_draft_tokens=3)
            details = out["usage"]["completion_tokens_details"]
            assert details == {
                "accepted_prediction_tokens": sum(st.accepted_per_row),
                "rejected_prediction_tokens": sum(st.rejected_per_row),
            }
            # logprobs are the target's: those of the full budget's forward over the completion
            ids = torch.tensor([TOK.encode(prompt) + ref])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids, budget="full").logits[0].float(), -1)
            L = len(TOK.encode(prompt))
            want = [float(lp[L - 1 + j, t]) for j, t in enumerate(ref)]
            got = out["choices"][0]["logprobs"]["token_logprobs"]
            assert got == pytest.approx(want, abs=1e-4)
            spec_seen += 1
        assert out["choices"][0]["text"] == TOK.decode(ref), (prompt, kind)
    assert spec_seen == 4
    assert server.health()["scheduler"]["active"] == 0


def test_chat_completions_take_the_fields(server: Server, model) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "full", "messages": msgs, "max_tokens": 9, "temperature": 0, "draft_budget": "50"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    plain = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "full", "messages": msgs, "max_tokens": 9, "temperature": 0},
        timeout=120,
    ).json()
    assert r.json()["choices"][0]["message"] == plain["choices"][0]["message"]
    assert "completion_tokens_details" in r.json()["usage"]


@pytest.mark.parametrize(
    "extra, param, msg",
    [
        ({"budget_schedule": SCHED, "model": "75"}, "model", "not one of the schedule's budgets"),
        ({"budget_schedule": [{"budget": "9b"}]}, "budget_schedule", "unknown"),
        ({"budget_schedule": SCHED, "draft_budget": "50"}, "budget_schedule", "does not combine"),
        ({"draft_budget": "9b"}, "draft_budget", "must be one of the budgets"),
        ({"draft_budget": "50", "num_draft_tokens": 0}, "num_draft_tokens", "integer in [1, 16]"),
        ({"num_draft_tokens": 3}, "num_draft_tokens", "needs draft_budget"),
    ],
)
def test_bad_fields_are_400(server: Server, extra: dict, param: str, msg: str) -> None:
    r = post(server, {"model": "full", "prompt": "ab", "max_tokens": 4} | extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and msg in err["message"]


# ------------------------------------------------------------------ batched several-requests
SPEC = {"draft_budget": "75", "num_draft_tokens": 3}


@pytest.fixture
def held(model_dir: Path, one_thread):
    """A fresh server whose scheduler loop starts only at ``release()``: what was posted before is
    admitted in one step. Yields (server, release)."""
    api = build_api(model_dir, max_context=256)
    start, api.scheduler.start = api.scheduler.start, lambda: None
    s = Server(api)
    yield s, start
    s.close()


def send(server: Server, body: dict) -> dict:
    """One completion: the JSON answer, or for stream=true {"text", "finish"} joined from its events."""
    if not body.get("stream"):
        r = post(server, body)
        assert r.status_code == 200, r.text
        return r.json()
    parts, finish = [], None
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for ln in r.iter_lines():
            if ln.startswith("data: {"):
                ch = json.loads(ln[6:])["choices"][0]
                parts.append(ch["text"])
                finish = ch["finish_reason"] or finish
    return {"text": "".join(parts), "finish": finish, "streamed_pieces": len(parts)}


def admitted_together(held, bodies: list[dict]) -> list[dict]:
    """Post ``bodies`` at once (threads), start the scheduler once all of them wait, return the answers."""
    server, release = held
    with ThreadPoolExecutor(len(bodies)) as ex:
        futs = [ex.submit(send, server, b) for b in bodies]
        t0 = time.time()
        while server.api.scheduler.snapshot()["queued"] < len(bodies):
            assert time.time() - t0 < 60, "the requests did not arrive"
            time.sleep(0.01)
        release()
        return [f.result() for f in futs]


def text_of(out: dict) -> str:
    return out["text"] if "finish" in out else out["choices"][0]["text"]


def stop_after(text: str):
    """stop= for in-process generate: the row is done once its decoded text contains ``text``."""
    return lambda new: torch.tensor([text in TOK.decode(new[0].tolist())])


def test_greedy_speculative_requests_run_as_one_batched_call(held, model) -> None:
    jobs = [("#0 the", 14, False), ("#1 xyzwxyzw q", 6, True), ("#2 ab", 11, False), ("#3 hello there", 3, True)]
    jobs.append(("#4 stop", 16, False))
    refs = [in_process(model, p, n, budget="full", **SPEC) for p, n, _ in jobs]
    # the last one has a stop string its solo completion reaches: in-process generate with stop= is the reference
    whole = TOK.decode(refs[-1][0])
    stop = whole[5:7]
    assert len(whole) >= 7 and whole.find(stop) >= 3
    refs[-1] = in_process(model, "#4 stop", 16, budget="full", stop=stop_after(stop), **SPEC)
    bodies = [
        {"prompt": p, "max_tokens": n, "temperature": 0, "model": "full", "stream": st, "logprobs": 1} | SPEC
        for p, n, st in jobs
    ]
    bodies[-1] |= {"stop": [stop]}
    outs = admitted_together(held, bodies)
    for (prompt, n, stream), (ref, st), out in zip(jobs, refs, outs, strict=True):
        want = TOK.decode(ref)
        if prompt.startswith("#4"):
            want = want[: want.find(stop)]
        assert text_of(out) == want, prompt
        if stream:
            assert out["finish"] == ("length" if len(ref) == n else "stop")
            continue
        assert out["usage"]["completion_tokens"] == len(ref), prompt  # the token ids' count (bytes need not be text)
        # each request's own counts: those of its solo run (with its own max_tokens and stop)
        assert out["usage"]["completion_tokens_details"] == {
            "accepted_prediction_tokens": sum(st.accepted_per_row),
            "rejected_prediction_tokens": sum(st.rejected_per_row),
        }, prompt
        ids = torch.tensor([TOK.encode(prompt) + ref])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids, budget="full").logits[0].float(), -1)
        L = len(TOK.encode(prompt))
        got = out["choices"][0]["logprobs"]["token_logprobs"]
        assert got == pytest.approx([float(lp[L - 1 + j, t]) for j, t in enumerate(ref)][: len(got)], abs=1e-4)
    snap = held[0].health()["scheduler"]
    assert (snap["several_calls"], snap["several_rows"], snap["several_requests"]) == (1, 5, 5)
    assert snap["active"] == 0 and snap["decode_steps"] == 0  # nothing went through the plain batches


def test_greedy_schedule_requests_run_as_one_batched_call(held, model) -> None:
    jobs = [("#0 q", 3, False), ("#1 zz", 8, True), ("#2 wxyz", 12, False), ("#3 a b c", 20, True)]
    refs, forced = [], []
    for p, n, _ in jobs:
        marks: list[tuple[int, torch.Tensor | None]] = []
        ids = torch.tensor([TOK.encode(p)])
        out = model.generate(
            ids,
            max_new_tokens=n,
            budget_schedule=SCHED,
            tokenizer=TOK,
            on_token=lambda _r, t, lg, _b, m=marks: m.append((t, lg)),
        )[0, ids.shape[1] :].tolist()
        assert [t for t, _ in marks] == out[: len(marks)]
        refs.append([t for t in out if t != EOS])
        forced.append([lg for t, lg in marks if t != EOS])
    assert any(lg is None for f in forced for lg in f)  # some request reached the first phase's force
    bodies = [
        {"prompt": p, "max_tokens": n, "temperature": 0, "model": "auto", "budget_schedule": SCHED, "stream": st}
        for p, n, st in jobs
    ]
    bodies[2] |= {"logprobs": 0}
    outs = admitted_together(held, bodies)
    for (prompt, _n, stream), ref, out in zip(jobs, refs, outs, strict=True):
        assert text_of(out) == TOK.decode(ref), prompt
        if stream:
            assert out["streamed_pieces"] > 1 or len(ref) <= 1
    # logprobs: a phase's own for generated tokens, 0 for forced ones
    got = outs[2]["choices"][0]["logprobs"]["token_logprobs"]
    want = [
        0.0 if lg is None else float(torch.log_softmax(lg.float(), -1)[t])
        for t, lg in zip(refs[2], forced[2], strict=True)
    ]
    assert got == pytest.approx(want, abs=1e-4)
    snap = held[0].health()["scheduler"]
    assert (snap["several_calls"], snap["several_rows"], snap["several_requests"]) == (1, 4, 4)


def test_mixed_admission_answers_all(held, model) -> None:
    plain = {"prompt": "plain one", "max_tokens": 9, "temperature": 0, "model": "50"}
    spec = [
        {"prompt": f"s{i} {'ab' * i}", "max_tokens": 5 + 3 * i, "temperature": 0, "model": "full"} | SPEC
        for i in range(3)
    ]
    sched = [
        {"prompt": f"t{i}" + " x" * i, "max_tokens": 7 + 4 * i, "temperature": 0, "model": "auto"} for i in range(3)
    ]
    for b in sched:
        b["budget_schedule"] = SCHED
    sampled = {"prompt": "seeded", "max_tokens": 10, "temperature": 0.9, "seed": 3, "model": "full"} | SPEC
    bodies = [plain, *spec, *sched, sampled]
    outs = admitted_together(held, bodies)
    want = [in_process(model, "plain one", 9, budget="50")[0]]
    want += [in_process(model, b["prompt"], b["max_tokens"], budget="full", **SPEC)[0] for b in spec]
    want += [in_process(model, b["prompt"], b["max_tokens"], budget_schedule=SCHED)[0] for b in sched]
    # a sampled request runs alone with its own seed: in-process generate with that seed
    want.append(in_process(model, "seeded", 10, budget="full", do_sample=True, temperature=0.9, seed=3, **SPEC)[0])
    for body, ref, out in zip(bodies, want, outs, strict=True):
        assert text_of(out) == TOK.decode(ref), body["prompt"]
    snap = held[0].health()["scheduler"]
    # one call for the 3 speculative, one for the 3 schedules, one for the sampled request alone
    assert (snap["several_calls"], snap["several_rows"], snap["several_requests"]) == (3, 3, 7)
    assert snap["prefills"] == 8 and snap["active"] == 0


def test_tokens_stream_during_the_call_and_a_cancelled_request_stops(model, monkeypatch, one_thread) -> None:
    """At the scheduler, token ids: every token event arrives while the batched generate call runs; a
    request cancelled after its 2nd token gets ("done", "cancelled") and nothing more; the others
    equal in-process generate (a schedule's forced tokens with logprob 0)."""
    spec = [("stream a", 12), ("stream bb", 12), ("stream ccc", 7)]
    plan = [("plan x", 4), ("plan yy", 9), ("plan zzz", 15)]
    refs = [in_process(model, p, n, budget="full", **SPEC) for p, n in spec]
    refs += [in_process(model, p, n, budget_schedule=SCHED) for p, n in plan]
    sched = Scheduler(model)
    in_call = [0]  # depth: a schedule calls model.generate again for each phase
    generate = model.generate

    def watched(*a, **kw):
        in_call[0] += 1
        try:
            return generate(*a, **kw)
        finally:
            in_call[0] -= 1

    monkeypatch.setattr(model, "generate", watched)
    events: list[list[tuple]] = [[] for _ in spec + plan]
    reqs: list[Request] = []

    def sink(i: int):
        def put(ev: tuple) -> None:
            events[i].append((ev, in_call[0] > 0))
            if i == 1 and sum(e[0] == "token" for e, _ in events[1]) == 2:
                reqs[1].cancel()

        return put

    for i, (p, n) in enumerate(spec + plan):
        several = dict(SPEC) if i < len(spec) else {"budget_schedule": SCHED, "tokenizer": TOK}
        reqs.append(Request(TOK.encode(p), "full", n, sink(i), logprobs=1, several=several))
        sched.submit(reqs[-1])
    sched.step()
    for i, (p, _n) in enumerate(spec + plan):
        kinds = [e[0] for e, _ in events[i]]
        toks = [e[1] for e, _ in events[i] if e[0] == "token"]
        assert all(during for (e, during) in events[i] if e[0] == "token")  # streamed, not after the call
        if i == 1:
            assert kinds == ["token", "token", "done"] and events[1][-1][0] == ("done", "cancelled")
            continue
        ref, st = refs[i]
        assert toks == ref and kinds[-1] == "done", p
        if i < len(spec):
            assert (reqs[i].accepted, reqs[i].rejected) == (sum(st.accepted_per_row), sum(st.rejected_per_row))
    forced = [e[2] for i in range(len(spec), len(reqs)) for e, _ in events[i] if e[0] == "token" and not e[2]["top"]]
    assert forced and all(f == {"logprob": 0.0, "top": []} for f in forced)
    c = sched.counters
    assert (c.several_calls, c.several_rows, c.several_requests, c.cancelled, c.finished) == (2, 3, 6, 1, 5)
