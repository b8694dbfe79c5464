"""The server's extra fields budget_schedule, draft_budget and num_draft_tokens: each result equals
in-process ``model.generate``, under concurrency; usage reports accepted / rejected prediction
tokens; logprobs are the target's; a schedule with a ``model`` outside its budgets is a 400."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import nestlm
from nestlm.serve.server import build_api
from nestlm.speculative import SpecStats
from nestlm.tokenizer import ByteTokenizer
from tests.integration.test_serve import Server
from tests.unit.test_scheduler import elastic_model, write_model_dir

TOK = ByteTokenizer()
EOS = 2
SCHED = [{"budget": "50", "stop": "e", "max_tokens": 6, "force": " so:"}, {"budget": "full"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_dir(elastic_model(), tmp_path_factory.mktemp("several") / "elastic")


@pytest.fixture(scope="module")
def model(model_dir: Path) -> nestlm.HybridLM:
    return nestlm.load(model_dir).eval()


@pytest.fixture(scope="module")
def server(model_dir: Path, one_thread):
    s = Server(build_api(model_dir, max_context=256))
    yield s
    s.close()


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
