"""One client cannot break the server for the others: malformed and extreme requests sent
concurrently with good ones of every budget get a 4xx with an OpenAI error body (or, for the
extreme but valid ones, their defined answer), the good ones get exactly their solo result, no
request hangs, and the server answers afterwards. A scheduler thread that dies does not leave a
client waiting."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from nestlm.serve.server import build_api
from nestlm.tokenizer import ByteTokenizer
from tests.integration.serving import Server
from tests.unit.test_scheduler import solo

TOK = ByteTokenizer()
TIMEOUT = 120  # seconds: a request that takes longer counts as hanging
SCHED = [{"budget": "50", "stop": "e", "max_tokens": 6, "force": " so:"}, {"budget": "full"}]
SPEC = {"draft_budget": "75", "num_draft_tokens": 3}

OK = {"model": "50", "prompt": "hi", "max_tokens": 4, "temperature": 0}
CHAT = {"model": "75", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
# (path, body: a dict, or raw bytes, status, param) of malformed or out-of-range requests
BAD = [
    ("completions", {**OK, "seed": 2**64}, 400, "seed"),  # Generator.manual_seed would raise in the scheduler
    ("completions", {**OK, "seed": -(2**63) - 1, "temperature": 0.7}, 400, "seed"),
    ("completions", b'{"model": "50", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("completions", b'{"model": "50", "prompt": "hi", "temperature": Infinity}', 400, "temperature"),
    ("completions", {**OK, "temperature": 2.5}, 400, "temperature"),
    ("completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("completions", {**OK, "top_k": -7}, 400, "top_k"),
    ("completions", {**OK, "top_k": 2.5}, 400, "top_k"),
    ("completions", {**OK, "min_p": 1.5}, 400, "min_p"),
    ("completions", {**OK, "logit_bias": {"999999": 5}}, 400, "logit_bias"),
    ("completions", {**OK, "logit_bias": {"65": 101}}, 400, "logit_bias"),
    ("completions", {**OK, "logit_bias": {"A": 1}}, 400, "logit_bias"),
    ("completions", {**OK, "logit_bias": [65, 1]}, 400, "logit_bias"),
    ("completions", {**OK, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("completions", {**OK, "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("completions", {**OK, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("completions", {**OK, "n": 0}, 400, "n"),
    ("completions", {**OK, "n": 10_000}, 400, "n"),
    ("completions", {**OK, "best_of": 4}, 400, "best_of"),
    ("completions", {**OK, "suffix": " end"}, 400, "suffix"),
    ("completions", {**OK, "prompt": [999999]}, 400, "prompt"),
    ("completions", {**OK, "max_tokens": 10**30}, 400, "max_tokens"),
    ("completions", {**OK, "logprobs": 21}, 400, "logprobs"),
    ("completions", b'{"model": "50", "prompt": "\\ud800 lone surrogate", "max_tokens": 2}', 400, "prompt"),
    ("completions", b'{"model": "50", "prompt": "hi", "stop": ["\\udfff"]}', 400, "stop"),
    ("completions", b'{"model": "50", "prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    ("completions", b'{"model": "50", "prompt": "\xff\xfe"}', 400, None),
    ("completions", {**OK, "stream": True, "stream_options": {"include_usage": True, "x": 1}}, 400, "stream_options"),
    ("completions", {**OK, "budget_schedule": [{"budget": "50"}] * 50, "model": "auto"}, 400, "budget_schedule"),
    ("completions", {**OK, "budget_schedule": [{"budget": "50", "max_tokens": 10**12}]}, 400, "budget_schedule"),
    ("completions", {**OK, "model": "full", "draft_budget": "50", "num_draft_tokens": 1000}, 400, "num_draft_tokens"),
    ("completions", {**OK, "ignore_eos": True}, 400, "ignore_eos"),
    ("chat/completions", {**CHAT, "tools": TOOLS}, 400, "tools"),
    ("chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat/completions", {**CHAT, "echo": True}, 400, "echo"),
    (
        "chat/completions",
        {**CHAT, "messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]},
        400,
        "messages[0].tool_calls",
    ),
    ("chat/completions", b'{"model": "75", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400, "messages"),
    ("chat/completions", {**CHAT, "seed": 2**64, "temperature": 1.0}, 400, "seed"),
    ("chat/completions", {**CHAT, "logit_bias": {"-1": 5}}, 400, "logit_bias"),
]


def in_process(model, prompt: str, n: int, **kw) -> list[int]:
    ids = torch.tensor([TOK.encode(prompt)])
    extra = {"tokenizer": TOK} if "budget_schedule" in kw else {}
    out = model.generate(ids, max_new_tokens=n, **kw, **extra)[0, ids.shape[1] :].tolist()
    return out[: out.index(2)] if 2 in out else out


def post(url: str, path: str, body) -> httpx.Response:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(f"{url}/v1/{path}", timeout=TIMEOUT, **kw)


def test_bad_requests_do_not_touch_good_ones(server: Server, model) -> None:
    # good: greedy requests of every budget, plain (completions and chat), schedules and speculative ones
    good = []
    for i in range(33):
        prompt, budget, n = f"#{i} {'abcdefgh' * (i % 5)}", model.budgets[i % 3], 6 + i % 11
        good.append(("completions", {"model": budget, "prompt": prompt, "max_tokens": n, "temperature": 0}))
    for i in range(3):
        body = {**CHAT, "model": model.budgets[i], "messages": [{"role": "user", "content": f"chat {i}"}]}
        good.append(("chat/completions", body | {"max_tokens": 7}))
    for i in range(3):
        body = {"model": "auto", "prompt": f"sched {i}", "max_tokens": 12, "temperature": 0, "budget_schedule": SCHED}
        good.append(("completions", body))
        good.append(
            ("completions", {"model": "full", "prompt": f"spec {i}", "max_tokens": 10, "temperature": 0} | SPEC)
        )
    # extreme but valid: a defined answer each
    extreme = [
        {**OK, "model": "full", "prompt": "tiny t", "max_tokens": 8, "temperature": 1e-40},  # greedy (as vLLM)
        {**OK, "model": "75", "prompt": "big k", "max_tokens": 8, "top_k": 10**9},  # no limit
        {**OK, "model": "full", "prompt": "last seed", "max_tokens": 8, "temperature": 0.9, "seed": 2**64 - 1},
        {**OK, "model": "50", "prompt": "neg seed", "max_tokens": 8, "temperature": 0.9, "seed": -(2**63)},
    ]
    jobs = [("good", path, body) for path, body in good] + [("bad", path, body) for path, body, _, _ in BAD]
    jobs += [("extreme", "completions", body) for body in extreme]
    assert len(BAD) >= 20 and len(good) >= 30
    start = threading.Barrier(len(jobs))

    def one(job):
        start.wait()
        return post(server.url, job[1], job[2])

    with ThreadPoolExecutor(len(jobs)) as ex:
        futures = [ex.submit(one, job) for job in jobs]
        results = [f.result(timeout=3 * TIMEOUT) for f in futures]  # none hangs
    answers = iter(results)
    for path, body in good:
        r = next(answers)
        assert r.status_code == 200, (body, r.text)
        out = r.json()["choices"][0]
        text = out["message"]["content"] if path.startswith("chat") else out["text"]
        if path.startswith("chat"):
            rendered = f"<|user|>{body['messages'][0]['content']}\n<|assistant|>"
            ref = solo(model, TOK.encode(rendered), body["model"], body["max_tokens"])
        elif "budget_schedule" in body:
            ref = in_process(model, body["prompt"], body["max_tokens"], budget_schedule=SCHED)
        elif "draft_budget" in body:
            ref = in_process(model, body["prompt"], body["max_tokens"], budget="full", **SPEC)
        else:
            ref = solo(model, TOK.encode(body["prompt"]), body["model"], body["max_tokens"])
        assert text == TOK.decode(ref), body
    for path, body, status, param in BAD:
        r = next(answers)
        assert r.status_code == status, (path, str(body)[:200], r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["param"] == param and err["type"] == "invalid_request_error", (str(body)[:200], err)
    texts = [next(answers) for _ in extreme]
    assert all(r.status_code == 200 for r in texts), [r.text for r in texts]
    texts = [r.json()["choices"][0]["text"] for r in texts]
    assert texts[0] == TOK.decode(solo(model, TOK.encode("tiny t"), "full", 8))
    sampling = {"do_sample": True, "temperature": 0.9}
    assert texts[2] == TOK.decode(in_process(model, "last seed", 8, budget="full", seed=2**64 - 1, **sampling))
    assert texts[3] == TOK.decode(in_process(model, "neg seed", 8, budget="50", seed=-(2**63), **sampling))
    # the server answers afterwards, and nothing is left running
    r = post(server.url, "completions", {**OK, "model": "full", "prompt": "after"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == TOK.decode(
        solo(model, TOK.encode("after"), "full", 4)
    )
    h = server.health()["scheduler"]
    assert h["active"] == 0 and h["queued"] == 0 and h["errors"] == 0


def test_a_null_field_counts_as_not_sent(server: Server, model) -> None:
    body = {**OK, "suffix": None, "tools": None, "best_of": None, "seed": None, "logit_bias": None, "n": None}
    r = post(server.url, "completions", body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == TOK.decode(solo(model, TOK.encode("hi"), "50", 4))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_scheduler_does_not_leave_clients_waiting(model_dir: Path, one_thread) -> None:
    """Whatever kills the scheduler's thread, a waiting client gets an OpenAI-shaped 500, streamed or not."""
    api = build_api(model_dir, max_context=256)

    def die() -> None:
        raise SystemExit("the scheduler's thread is gone")  # not an Exception: the loop's catch-all lets it go

    api.scheduler.step = die
    s = Server(api)
    try:
        r = post(s.url, "completions", OK)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error", r.text
        with httpx.stream("POST", s.url + "/v1/completions", json={**OK, "stream": True}, timeout=TIMEOUT) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2][6:])
    finally:
        s.close()
