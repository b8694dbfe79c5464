"""Operating `nestlm serve`: access log, Prometheus /metrics, GET /v1/models/{id}, the listening line, a taken port."""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.serving import Server

ACCESS = "nestlm.serve.access"


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """/metrics read with prometheus_client's own parser: sample name -> {sorted labels: value}."""
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_budget(samples: dict[tuple, float], status: str | None = None) -> dict[str, float]:
    return {dict(k)["budget"]: v for k, v in samples.items() if status is None or dict(k).get("status") == status}


def test_metrics_count_every_request_per_budget_and_the_access_log(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=ACCESS)
    before = scrape(server.url)
    assert by_budget(before["nestlm_prompt_tokens_total"]) == {"full": 0, "75": 0, "50": 0}
    assert before["nestlm_queue_length"] == {(): 0} and set(by_budget(before["nestlm_running_batch_size"])) == {
        "full",
        "75",
        "50",
    }
    c = server.client()
    requests: Counter[tuple[str, str]] = Counter()
    prompt, gen = Counter(), Counter()

    def count(budget: str, usage) -> None:
        requests[budget, "200"] += 1
        prompt[budget] += usage.prompt_tokens
        gen[budget] += usage.completion_tokens

    secret = "do not log this prompt"
    for i, budget in enumerate(["50", "50", "50", "75", "full"]):
        r = c.completions.create(model=budget, prompt=f"{secret} {i}", max_tokens=3 + i, temperature=0)
        count(budget, r.usage)
    r = c.chat.completions.create(model="75", messages=[{"role": "user", "content": secret}], max_tokens=4)
    count("75", r.usage)
    r = c.completions.create(model="auto", prompt=secret, max_tokens=5, temperature=0)
    count(r.model, r.usage)  # counted under the budget auto chose
    chunks = list(
        c.completions.create(
            model="full",
            prompt=secret,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    count("full", chunks[-1].usage)
    with pytest.raises(openai.BadRequestError):  # refused before running: a 400 under its budget, no tokens
        c.completions.create(model="50", prompt=secret, max_tokens=3, temperature=7)
    requests["50", "400"] += 1
    with pytest.raises(openai.NotFoundError):  # an unknown model: label "-", never the name sent
        c.completions.create(model="no-such-budget", prompt=secret, max_tokens=3)
    requests["-", "404"] += 1

    t0 = time.time()
    while True:  # a stream is counted when its generator ends, just after the client read [DONE]
        after = scrape(server.url)
        got = {
            (dict(k)["budget"], dict(k)["status"]): v - before.get("nestlm_requests_total", {}).get(k, 0)
            for k, v in after["nestlm_requests_total"].items()
        }
        got = {k: v for k, v in got.items() if v}
        if got == dict(requests) or time.time() - t0 > 10:
            break
        time.sleep(0.05)
    assert got == dict(requests)
    for name, want in (("nestlm_prompt_tokens_total", prompt), ("nestlm_generation_tokens_total", gen)):
        now, then = by_budget(after[name]), by_budget(before[name])
        assert {b: now[b] - then.get(b, 0) for b in now if now[b] - then.get(b, 0)} == dict(want), name
    hist = by_budget(after["nestlm_request_latency_seconds_count"])
    sent = Counter()
    for (b, _), n in requests.items():
        sent[b] += n
    assert {b: v - by_budget(before["nestlm_request_latency_seconds_count"]).get(b, 0) for b, v in hist.items()} == {
        b: sent.get(b, 0) for b in hist
    }
    assert after["nestlm_queue_length"] == {(): 0}

    lines = [r.getMessage() for r in caplog.records if r.name == ACCESS]
    assert len(lines) == sum(requests.values())
    assert all("\n" not in ln and secret not in ln for ln in lines)  # the prompt is not logged by default
    first = lines[0]
    assert '"POST /v1/completions" 200 budget=50 model=50 prompt_tokens=' in first and "latency_ms=" in first
    assert any(" 404 budget=- model=- " in ln and "error=model_not_found" in ln for ln in lines)
    assert any("stream=true" in ln for ln in lines)


def test_models_by_id(server: Server) -> None:
    c = server.client()
    m = c.models.retrieve("75")
    assert (m.id, m.object, m.owned_by) == ("75", "model", "nestlm")
    assert m.model_dump() == next(x for x in c.models.list().data if x.id == "75").model_dump()
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("6b")
    r = httpx.get(server.url + "/v1/models/6b")
    err = r.json()["error"]
    assert r.status_code == 404 and set(err) == {"message", "type", "param", "code"}
    assert err["code"] == "model_not_found" and "full, 75, 50" in err["message"]


def test_a_taken_port_is_one_line_and_exit_2(model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from nestlm.cli import main

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "--model", str(model_dir), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("nestlm: error: ") and f"port {port} is in use" in err[0], err
        res = subprocess.run(
            [sys.executable, "-m", "nestlm", "serve", "--model", str(model_dir), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"port {port} is in use" in lines[0], res.stderr


def test_the_serving_line_comes_once_listening_and_log_prompts(model_dir: Path) -> None:
    """--port 0: the line names the port the system gave; /health answers at once; --log-prompts logs the prompt."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nestlm", "serve", "--model", str(model_dir), "--port", "0", "--log-prompts"],
        env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr], daemon=True).start()

    def next_line() -> str:
        try:
            return lines.get(timeout=240)
        except queue.Empty:
            raise AssertionError("nestlm serve printed nothing") from None

    try:
        first = next_line()
        assert first.startswith("nestlm serve: serving on http://127.0.0.1:"), first
        url = first.split("serving on ")[1].split("/v1")[0]
        assert url.rsplit(":", 1)[1] != "0"
        assert httpx.get(url + "/health", timeout=30).status_code == 200  # no retry: it listens already
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        c.completions.create(model="50", prompt='say "hi"\nthen go', max_tokens=2, temperature=0)
        log = next_line()
        assert '"POST /v1/completions" 200 budget=50' in log and log.rstrip("\n").endswith(
            'prompt="say \\"hi\\"\\nthen go"'
        ), log
    finally:
        proc.terminate()
        proc.wait(timeout=60)
