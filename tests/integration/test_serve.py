"""`nestlm serve`: the real server on loopback, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from nestlm.serve.server import build_api
from nestlm.tokenizer import ByteTokenizer
from tests.integration.serving import Server, free_port
from tests.unit.test_scheduler import CHAT_TEMPLATE, FakeClock, elastic_model, solo, write_model_dir

TOK = ByteTokenizer()


def text_of(model, prompt: str, budget: str, n: int) -> str:
    return TOK.decode(solo(model, TOK.encode(prompt), budget, n))


def test_models_and_health(server: Server) -> None:
    assert [m.id for m in server.client().models.list().data] == ["full", "75", "50"]
    h = server.health()
    assert h["status"] == "ok" and h["scheduler"]["active"] == 0


def test_greedy_equals_generate_for_every_budget(server: Server, model) -> None:
    c = server.client()
    for budget in model.budgets:
        prompt = f"def f_{budget}(x):"
        r = c.completions.create(model=budget, prompt=prompt, max_tokens=12, temperature=0)
        ref_ids = solo(model, TOK.encode(prompt), budget, 12)
        assert r.model == budget and r.choices[0].text == TOK.decode(ref_ids)
        assert r.usage.prompt_tokens == len(TOK.encode(prompt)) and r.usage.completion_tokens == len(ref_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason == ("length" if len(ref_ids) == 12 else "stop")
    # a list of prompts: one choice each, in order
    r = c.completions.create(model="50", prompt=["ab", "cde"], max_tokens=5, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert [ch.text for ch in r.choices] == [text_of(model, "ab", "50", 5), text_of(model, "cde", "50", 5)]
    # max_completion_tokens wins over max_tokens
    r = c.completions.create(
        model="75", prompt="xyz", max_tokens=3, temperature=0, extra_body={"max_completion_tokens": 6}
    )
    assert r.choices[0].text == text_of(model, "xyz", "75", 6)


def test_chat_completions(server: Server, model) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = server.client().chat.completions.create(model="75", messages=msgs, max_tokens=10, temperature=0)
    rendered = "<|system|>be brief\n<|user|>hello\n<|assistant|>"  # CHAT_TEMPLATE by hand
    assert "<|assistant|>" in CHAT_TEMPLATE
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text_of(model, rendered, "75", 10)
    assert r.usage.prompt_tokens == len(rendered.encode())
    r2 = server.client().chat.completions.create(
        model="75", messages=msgs, max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    lp = r2.choices[0].logprobs.content
    assert len(lp) == r2.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in lp)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in lp)  # greedy: the top token


def test_streaming_equals_non_streaming(server: Server) -> None:
    c = server.client()
    for budget in ("full", "50"):
        kw = dict(model=budget, prompt="import os\n", max_tokens=20, temperature=0)
        whole = c.completions.create(**kw)
        parts, usage, finish = [], None, None
        for ch in c.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if ch.usage is not None:
                usage = ch.usage
            for x in ch.choices:
                parts.append(x.text)
                finish = x.finish_reason or finish
        assert "".join(parts) == whole.choices[0].text and len(parts) > 2
        assert finish == whole.choices[0].finish_reason and usage == whole.usage
    msgs = [{"role": "user", "content": "count"}]
    whole = c.chat.completions.create(model="75", messages=msgs, max_tokens=15, temperature=0)
    parts = [
        x.delta.content or ""
        for ch in c.chat.completions.create(model="75", messages=msgs, max_tokens=15, temperature=0, stream=True)
        for x in ch.choices
    ]
    assert "".join(parts) == whole.choices[0].message.content


def test_raw_stream_ends_with_done(server: Server) -> None:
    body = {"model": "50", "prompt": "a", "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_stop_seed_and_echo_logprobs(server: Server, model) -> None:
    c = server.client()
    full = c.completions.create(model="full", prompt="stop me", max_tokens=16, temperature=0).choices[0].text
    assert len(full) >= 4
    stop = full[2:4]
    r = c.completions.create(model="full", prompt="stop me", max_tokens=16, temperature=0, stop=[stop, "\x00never"])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        x.text
        for ch in c.completions.create(
            model="full", prompt="stop me", max_tokens=16, temperature=0, stop=stop, stream=True
        )
        for x in ch.choices
    )
    assert streamed == r.choices[0].text
    # seed: the same sampled text twice, and the text model.generate samples with that seed alone
    a, b = (
        c.completions.create(model="50", prompt="seed", max_tokens=10, temperature=0.9, seed=3).choices[0].text
        for _ in range(2)
    )
    ref = model.generate(
        torch.tensor([TOK.encode("seed")]), max_new_tokens=10, budget="50", do_sample=True, temperature=0.9, seed=3
    )[0, 4:].tolist()
    assert a == b == TOK.decode(ref[: ref.index(2)] if 2 in ref else ref)
    # what lm-evaluation-harness's local-completions sends to score loglikelihoods: token ids, echo, 1 token
    ctx, cont = TOK.encode("x = 1"), TOK.encode(" + 2")
    payload = {"model": "75", "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}
    out = httpx.post(server.url + "/v1/completions", json=payload).json()
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ctx + cont) + 1 and lp["token_logprobs"][0] is None
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        ref_lp = torch.log_softmax(model(ids, budget="75").logits[0], -1)
    want = sum(float(ref_lp[j - 1, ids[0, j]]) for j in range(len(ctx), len(ctx + cont)))
    got = sum(lp["token_logprobs"][len(ctx) : -1])  # the harness's parse_logprobs
    assert got == pytest.approx(want, abs=1e-4)
    greedy = all(
        t == max(top.values())
        for t, top in zip(lp["token_logprobs"][len(ctx) : -1], lp["top_logprobs"][len(ctx) : -1], strict=True)
    )
    assert greedy == all(int(ref_lp[j - 1].argmax()) == ids[0, j] for j in range(len(ctx), len(ctx + cont)))
    # max_tokens=0 with echo: the prompt's logprobs only
    out = httpx.post(server.url + "/v1/completions", json={**payload, "max_tokens": 0, "prompt": "x = 1"}).json()
    assert out["choices"][0]["text"] == "x = 1" and out["usage"]["completion_tokens"] == 0
    assert len(out["choices"][0]["logprobs"]["token_logprobs"]) == len(ctx)


def test_thirty_concurrent_mixed_budgets_equal_solo(server: Server, model) -> None:
    before = server.health()["scheduler"]
    jobs = [(f"#{i} {'abcdefgh' * (i % 5)}", model.budgets[i % 3], 8 + i % 13) for i in range(33)]
    start = threading.Barrier(len(jobs))
    c = server.client()

    def one(job):
        prompt, budget, n = job
        start.wait()
        return c.completions.create(model=budget, prompt=prompt, max_tokens=n, temperature=0)

    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(one, jobs))
    for (prompt, budget, n), r in zip(jobs, results, strict=True):
        assert r.model == budget and r.choices[0].text == text_of(model, prompt, budget, n), (prompt, budget)
    after = server.health()["scheduler"]
    # a server that answers one request at a time never runs a decode step with two rows
    assert after["multi_row_steps"] - before["multi_row_steps"] > 0
    assert after["max_rows"] >= 4
    rows = after["decode_rows"] - before["decode_rows"]
    steps = after["decode_steps"] - before["decode_steps"]
    assert rows / steps > 1.5, (rows, steps)
    assert after["active"] == 0


def test_bad_requests_then_a_good_one(server: Server, tmp_path: Path) -> None:
    url = server.url + "/v1"
    ok = {"model": "50", "prompt": "hi", "max_tokens": 2, "temperature": 0}
    chat_ok = {"model": "50", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    long = "x" * 300  # the server's max context is 256
    cases = [
        ("completions", b"{not json", 400, None),
        ("completions", b"[1, 2]", 400, None),
        ("completions", {**ok, "model": "nope"}, 404, "model"),
        ("completions", {**ok, "model": 7}, 400, "model"),
        ("completions", {k: v for k, v in ok.items() if k != "model"}, 400, "model"),
        ("completions", {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("completions", {**ok, "max_tokens": -3}, 400, "max_tokens"),
        ("completions", {**ok, "max_tokens": 255}, 400, "max_tokens"),
        ("completions", {**ok, "max_tokens": "5"}, 400, "max_tokens"),
        ("completions", {**ok, "max_tokens": 2.5}, 400, "max_tokens"),
        ("completions", {**ok, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ("completions", {**ok, "prompt": long}, 400, "prompt"),
        ("completions", {**ok, "prompt": ""}, 400, "prompt"),
        ("completions", {**ok, "prompt": []}, 400, "prompt"),
        ("completions", {**ok, "prompt": [[]]}, 400, "prompt"),
        ("completions", {**ok, "prompt": 5}, 400, "prompt"),
        ("completions", {**ok, "prompt": [1, "a"]}, 400, "prompt"),
        ("completions", {**ok, "prompt": [999999]}, 400, "prompt"),
        ("completions", {**ok, "prompt": None}, 400, "prompt"),
        ("completions", {**ok, "temperature": -0.1}, 400, "temperature"),
        ("completions", {**ok, "temperature": "hot"}, 400, "temperature"),
        ("completions", {**ok, "top_p": 0}, 400, "top_p"),
        ("completions", {**ok, "top_p": 1.5}, 400, "top_p"),
        ("completions", {**ok, "stop": 3}, 400, "stop"),
        ("completions", {**ok, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("completions", {**ok, "seed": "x"}, 400, "seed"),
        ("completions", {**ok, "stream": "yes"}, 400, "stream"),
        ("completions", {**ok, "stream_options": {"include_usage": True}}, 400, "stream_options"),
        ("completions", {**ok, "logprobs": 99}, 400, "logprobs"),
        ("completions", {**ok, "echo": "yes"}, 400, "echo"),
        ("completions", {**ok, "n": 0}, 400, "n"),  # n is supported (test_serve_sampling.py); up to 16
        ("completions", {**ok, "n": 17}, 400, "n"),
        ("chat/completions", {**chat_ok, "messages": []}, 400, "messages"),
        ("chat/completions", {**chat_ok, "messages": "hi"}, 400, "messages"),
        ("chat/completions", {**chat_ok, "messages": [{"role": "bot", "content": "x"}]}, 400, "messages[0].role"),
        ("chat/completions", {**chat_ok, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("chat/completions", {**chat_ok, "messages": [{"role": "user", "content": long}]}, 400, "messages"),
        ("chat/completions", {**chat_ok, "logprobs": 3}, 400, "logprobs"),
        ("chat/completions", {**chat_ok, "top_logprobs": 2}, 400, "top_logprobs"),
        # no request field names a file: a path-like chat_template or model is not read
        ("chat/completions", {**chat_ok, "model": str(tmp_path)}, 404, "model"),
    ]
    http = httpx.Client(timeout=60)
    for path, body, status, param in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = http.post(f"{url}/{path}", **kw)
        assert r.status_code == status, (body, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (body, err)
        assert err["param"] == param, (body, err)
        good = http.post(f"{url}/{path}", json=chat_ok if path.startswith("chat") else ok)
        assert good.status_code == 200, good.text
    r = httpx.post(f"{url}/completions", json={**ok, "model": "nope"})
    assert "full, 75, 50" in r.json()["error"]["message"] and r.json()["error"]["code"] == "model_not_found"
    # unknown routes and methods are OpenAI-shaped too
    r = httpx.get(f"{url}/nothing")
    assert r.status_code == 404 and "error" in r.json()
    # the openai client raises its typed errors on these
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="full", prompt="x", max_tokens=1, temperature=-1)
    assert server.health()["scheduler"]["active"] == 0


def test_disconnect_mid_stream_frees_the_slot(server: Server) -> None:
    body = {"model": "full", "prompt": "go", "max_tokens": 250, "temperature": 0, "stream": True}
    cancelled = server.health()["scheduler"]["cancelled"]
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        it = r.iter_lines()
        got = [next(it) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        assert server.health()["scheduler"]["active"] == 1
    t0 = time.time()
    while server.health()["scheduler"]["active"] != 0:
        assert time.time() - t0 < 5, "the slot of a client that went away was not freed"
        time.sleep(0.02)
    h = server.health()["scheduler"]
    assert h["cancelled"] == cancelled + 1 and h["active"] == 0


def test_auto_picks_by_measured_latency(model_dir: Path, model) -> None:
    api = build_api(model_dir, target_latency_ms=100, model=model)
    clock = FakeClock()
    api.scheduler.latency.clock = clock
    s = Server(api)
    try:
        c = s.client()
        r = c.completions.create(model="auto", prompt="q", max_tokens=3, temperature=0)
        assert r.model == "full" and r.choices[0].text == text_of(model, "q", "full", 3)  # idle
        for _ in range(10):  # forced latency figures: full and 75 are slow under load, 50 meets the target
            api.scheduler.latency.record("full", 0.400)
            api.scheduler.latency.record("75", 0.200)
            api.scheduler.latency.record("50", 0.050)
        r = c.completions.create(model="auto", prompt="q", max_tokens=3, temperature=0)
        assert r.model == "50" and r.choices[0].text == text_of(model, "q", "50", 3)
        chunks = list(c.completions.create(model="auto", prompt="q", max_tokens=3, temperature=0, stream=True))
        assert {ch.model for ch in chunks} == {"50"}
        clock.t += 60  # the load is over: the samples age out, the full budget answers again
        r = c.completions.create(model="auto", prompt="q", max_tokens=3, temperature=0)
        assert r.model == "full"
        assert api.scheduler.counters.auto_choices == {"full": 2, "50": 2}
    finally:
        s.close()


def test_queue_full_is_429_and_api_key(tmp_path: Path, one_thread) -> None:
    model = elastic_model(eos=None)  # no EOS: the long request holds its slot until its client leaves
    api = build_api(write_model_dir(model, tmp_path / "m"), max_batch=1, max_queue=1, api_key="sekret", model=model)
    s = Server(api)
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = httpx.post(s.url + "/v1/completions", headers=headers, json={"model": "50", "prompt": "a"})
            assert r.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        c = s.client("sekret")
        assert [m.id for m in c.models.list().data] == ["full", "75", "50"]
        auth = {"Authorization": "Bearer sekret"}
        long = {"model": "full", "prompt": "go", "max_tokens": 4000, "temperature": 0, "stream": True}
        result = {}

        def queued_request() -> None:
            body = {"model": "50", "prompt": "b", "max_tokens": 3, "temperature": 0}
            result["r"] = httpx.post(s.url + "/v1/completions", json=body, headers=auth, timeout=60)

        with httpx.stream("POST", s.url + "/v1/completions", json=long, headers=auth) as first:
            lines = first.iter_lines()  # (kept: a dropped iterator closes the response)
            next(lines)  # the stream holds the one slot
            waiting = threading.Thread(target=queued_request)
            waiting.start()
            t0 = time.time()
            while s.health()["scheduler"]["queued"] != 1:
                assert time.time() - t0 < 10
                time.sleep(0.01)
            r = httpx.post(s.url + "/v1/completions", json={"model": "50", "prompt": "a"}, headers=auth)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                c.completions.create(model="50", prompt="a", max_tokens=1)
        waiting.join(timeout=60)  # the queued request runs once the first client has gone
        assert result["r"].status_code == 200
        assert result["r"].json()["choices"][0]["text"] == TOK.decode(solo(model, TOK.encode("b"), "50", 3, None))
        r = c.completions.create(model="50", prompt="a", max_tokens=2, temperature=0)
        assert r.choices[0].text == TOK.decode(solo(model, TOK.encode("a"), "50", 2, None))
    finally:
        s.close()


def test_plain_model_without_chat_template(tmp_path: Path, one_thread) -> None:
    plain = elastic_model(eos=None)
    plain.elastic = {}
    d = write_model_dir(plain, tmp_path / "plain-model", chat_template=None)
    s = Server(build_api(d))
    try:
        c = s.client()
        assert [m.id for m in c.models.list().data] == ["plain-model"]
        r = c.completions.create(model="plain-model", prompt="hey", max_tokens=5, temperature=0)
        assert r.model == "plain-model" and r.choices[0].text == TOK.decode(
            solo(plain, TOK.encode("hey"), None, 5, None)
        )
        assert c.completions.create(model="auto", prompt="hey", max_tokens=5, temperature=0).model == "plain-model"
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="plain-model", messages=[{"role": "user", "content": "x"}])
    finally:
        s.close()


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    out = []
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(f):
            continue
        for line in Path(f).read_text().splitlines()[1:]:
            parts = line.split()
            addr, state = parts[1], parts[3]
            if state == "0A" and int(addr.rsplit(":", 1)[1], 16) == port:
                out.append(addr.rsplit(":", 1)[0])
    return out


def test_cli_serve_loopback_by_default_with_key_from_env(model_dir: Path) -> None:
    port = free_port()
    env = dict(os.environ, NESTLM_API_KEY="from-env", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nestlm", "serve", "--model", str(model_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() - t0 < 120, "nestlm serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert _listening(port) == ["0100007F"]  # 127.0.0.1 only
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="from-env", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["full", "75", "50"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serve_bad_input(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from nestlm.cli import main

    for args, msg in (
        (["--model", str(tmp_path / "none")], "does not exist"),
        (["--model", str(model_dir), "--port", "70000"], "--port"),
        (["--model", str(model_dir), "--max-batch", "0"], "--max-batch"),
        (["--model", str(model_dir), "--target-latency-ms", "0"], "--target-latency-ms"),
    ):
        assert main(["serve", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("nestlm: error:") and "\n" not in err and msg in err, err
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "nestlm"
