"""The sampling fields users expect, honoured by the server: logit_bias, presence_penalty,
frequency_penalty, repetition_penalty, top_k, min_p and n, in completions and chat, rows of one
batch each with their own settings, budget schedules and speculative requests too; each answer
equals in-process ``model.generate`` with the same arguments (and seed). A field the server does
not implement is a 400 naming it."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from nestlm.serve.server import build_api
from nestlm.tokenizer import ByteTokenizer
from tests.integration.serving import Server
from tests.integration.test_serve_several import admitted_together, text_of

TOK = ByteTokenizer()
A = TOK.encode("A")[0]
SCHED = [{"budget": "50", "stop": "e", "max_tokens": 6, "force": " so:"}, {"budget": "full"}]
UNFORCED = [{"budget": "50", "max_tokens": 5}, {"budget": "full"}]  # every token generated, none forced
SHAPING = ("top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
SPEC = {"draft_budget": "75", "num_draft_tokens": 3}


@pytest.fixture
def held(model_dir: Path, one_thread):
    """A fresh server whose scheduler loop starts only at ``release()`` (as in test_serve_several)."""
    api = build_api(model_dir, max_context=256)
    start, api.scheduler.start = api.scheduler.start, lambda: None
    s = Server(api)
    yield s, start
    s.close()


def post(server: Server, body: dict, path: str = "completions") -> dict:
    r = httpx.post(f"{server.url}/v1/{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def texts(out: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in out["choices"]]


def reference(model, prompt: str, n: int, body: dict) -> str:
    """In-process ``model.generate`` with the request's fields (the server returns no EOS)."""
    return TOK.decode(reference_ids(model, prompt, n, body))


def reference_ids(model, prompt: str, n: int, body: dict) -> list[int]:
    kw = {k: body[k] for k in SHAPING[:-1] if body.get(k) is not None}
    if body.get("logit_bias"):
        kw["logit_bias"] = {int(k): v for k, v in body["logit_bias"].items()}
    if body.get("temperature", 1.0) > 0:
        kw |= {"do_sample": True, "temperature": body.get("temperature", 1.0), "seed": body["seed"]}
        kw |= {"top_p": body["top_p"]} if "top_p" in body else {}
    if "budget_schedule" in body:
        kw |= {"budget_schedule": body["budget_schedule"], "tokenizer": TOK}
    else:
        kw |= {"budget": body["model"]} | {k: body[k] for k in SPEC if k in body}
    ids = torch.tensor([TOK.encode(prompt)])
    out = model.generate(ids, max_new_tokens=n, **kw)[0, ids.shape[1] :].tolist()
    return out[: out.index(2)] if 2 in out else out


def test_logit_bias_100_makes_every_token_that_token(server: Server, model) -> None:
    base = {"prompt": "ab ab ab", "max_tokens": 12, "temperature": 0}
    plain = post(server, {**base, "model": "full"})
    assert texts(plain) != ["A" * 12]  # teeth: without the bias the model says something else
    bias = {"logit_bias": {str(A): 100}}
    for extra in ({"model": "full"}, {"model": "50", "n": 2}, {"model": "auto", "budget_schedule": UNFORCED}):
        out = post(server, base | bias | extra)
        n = extra.get("n", 1)
        assert texts(out) == ["A" * 12] * n and out["usage"]["completion_tokens"] == 12 * n
    out = post(server, base | bias | {"model": "full"} | SPEC)
    assert texts(out) == ["A" * 12] and out["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
    chat = {"model": "75", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "temperature": 0}
    assert texts(post(server, chat | bias, "chat/completions")) == ["A" * 9]
    stream = httpx.post(f"{server.url}/v1/completions", json=base | bias | {"model": "75", "stream": True}, timeout=120)
    pieces = [json.loads(ln[6:])["choices"][0]["text"] for ln in stream.text.splitlines() if ln.startswith("data: {")]
    assert "".join(pieces) == "A" * 12
    # -100 on the greedy token: it never comes
    body = base | {"model": "full"}
    first = reference_ids(model, "ab ab ab", 12, body)[0]
    body |= {"logit_bias": {str(first): -100}}
    assert texts(post(server, body)) == [reference(model, "ab ab ab", 12, body)]
    assert first not in reference_ids(model, "ab ab ab", 12, body)


def test_top_k_1_sampling_equals_greedy(server: Server, model) -> None:
    prompts = ["ab ab ab", "#1 xyzw", "hello there"]
    differs = 0
    for i, p in enumerate(prompts):
        budget = model.budgets[i]
        greedy = texts(post(server, {"model": budget, "prompt": p, "max_tokens": 14, "temperature": 0}))
        sampled = {"model": budget, "prompt": p, "max_tokens": 14, "temperature": 1.0, "seed": 100 + i}
        assert texts(post(server, sampled | {"top_k": 1})) == greedy, p
        assert texts(post(server, sampled | {"top_k": 1, "n": 2, "seed": None})) == greedy * 2, p
        differs += texts(post(server, sampled)) != greedy
    assert differs >= 2  # teeth: sampling without top_k is not greedy
    for extra in ({"model": "auto", "budget_schedule": SCHED}, {"model": "full"} | SPEC):
        body = {"prompt": "ab ab ab", "max_tokens": 14} | extra
        greedy = texts(post(server, body | {"temperature": 0}))
        assert texts(post(server, body | {"temperature": 1.0, "top_k": 1, "seed": 7})) == greedy, extra
    chat = {"model": "50", "messages": [{"role": "user", "content": "hey"}], "max_tokens": 10}
    greedy = texts(post(server, chat | {"temperature": 0}, "chat/completions"))
    assert texts(post(server, chat | {"temperature": 1.5, "top_k": 1}, "chat/completions")) == greedy


def test_n_gives_n_choices_the_same_with_a_seed(server: Server, model) -> None:
    body = {"model": "full", "prompt": "#0 the", "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 11}
    first, again = post(server, body), post(server, body)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert texts(first) == texts(again) and len(set(texts(first))) == 3  # the same three, three different ones
    # choice j is the request's sampling with seed + j
    assert texts(first) == [reference(model, "#0 the", 12, body | {"seed": 11 + j}) for j in range(3)]
    assert first["usage"]["prompt_tokens"] == len(TOK.encode("#0 the"))
    ids = [reference_ids(model, "#0 the", 12, body | {"seed": 11 + j}) for j in range(3)]
    assert first["usage"]["completion_tokens"] == sum(map(len, ids))
    # a list of prompts: n choices each, prompt by prompt; streamed the same
    many = post(server, body | {"prompt": ["ab", "cde"], "n": 2})
    want = [reference(model, p, 12, body | {"seed": 11 + j}) for p in ("ab", "cde") for j in range(2)]
    assert texts(many) == want
    parts = ["", "", "", ""]
    stream = body | {"prompt": ["ab", "cde"], "n": 2, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=stream, timeout=120) as r:
        for ln in r.iter_lines():
            if ln.startswith("data: {"):
                c = json.loads(ln[6:])["choices"][0]
                parts[c["index"]] += c["text"]
    assert parts == want
    # chat, through the openai client
    client = server.client()
    msgs = [{"role": "user", "content": "hi"}]
    a, b = (
        client.chat.completions.create(model="75", messages=msgs, max_tokens=8, n=3, seed=5, temperature=1.0)
        for _ in range(2)
    )
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len(a.choices) == 3 and len({c.message.content for c in a.choices}) > 1
    # several-budget requests take n too
    spec = {"model": "full", "prompt": "#1 xyzw", "max_tokens": 10, "temperature": 0.9, "n": 2, "seed": 3} | SPEC
    assert texts(post(server, spec)) == [reference(model, "#1 xyzw", 10, spec | {"seed": 3 + j}) for j in range(2)]


UNSUPPORTED = {
    "completions": {"suffix": " end", "best_of": 3, "user": "me", "ignore_eos": True, "min_tokens": 3},
    "chat/completions": {
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
        "functions": [{"name": "f"}],
        "response_format": {"type": "json_object"},
        "parallel_tool_calls": False,
        "store": True,
        "reasoning_effort": "low",
        "echo": True,
        "best_of": 2,
    },
}


def test_unsupported_fields_are_400_naming_them(server: Server) -> None:
    ok = {
        "completions": {"model": "50", "prompt": "hi", "max_tokens": 2, "temperature": 0},
        "chat/completions": {"model": "50", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    }
    for path, fields in UNSUPPORTED.items():
        for field, value in fields.items():
            r = httpx.post(f"{server.url}/v1/{path}", json=ok[path] | {field: value}, timeout=60)
            assert r.status_code == 400, (path, field, r.text)
            err = r.json()["error"]
            assert err["param"] == field and f"'{field}'" in err["message"], err
            assert err["type"] == "invalid_request_error" and set(err) == {"message", "type", "param", "code"}
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="suffix"):
        c.completions.create(model="50", prompt="hi", max_tokens=2, suffix="x")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(
            model="50", messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
        )
    assert post(server, ok["completions"] | {"best_of": 1})["choices"]  # best_of equal to n is what it does


def test_sampling_fields_equal_in_process_generate(server: Server, model) -> None:
    p = "ab ab ab"
    base = {"prompt": p, "max_tokens": 16, "model": "full"}
    cases = [
        {"temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 0.5},
        {"temperature": 0, "repetition_penalty": 1.8},
        {"temperature": 0, "frequency_penalty": -2},
        {"temperature": 0, "logit_bias": {"133": -100, "73": 1.5}},
        {"temperature": 0.8, "seed": 4, "top_k": 3},
        {"temperature": 0.8, "seed": 4, "min_p": 0.3},
        {"temperature": 0.8, "seed": 4, "top_p": 0.9, "top_k": 5, "min_p": 0.1, "presence_penalty": 1.0}
        | {"repetition_penalty": 1.3, "logit_bias": {"73": 2}},
    ]
    greedy = reference(model, p, 16, base | {"temperature": 0})
    sampled = reference(model, p, 16, base | {"temperature": 0.8, "seed": 4})
    for case in cases:
        body = base | case
        want = reference(model, p, 16, body)
        assert want != (greedy if case["temperature"] == 0 else sampled), case  # teeth: the field changes the text
        assert texts(post(server, body)) == [want], case
    # chat: the same fields on the rendered conversation
    chat = {"model": "75", "messages": [{"role": "user", "content": "ab ab"}], "max_tokens": 12}
    chat |= {"temperature": 0.7, "seed": 9, "top_k": 4, "frequency_penalty": 1.2, "logit_bias": {"73": 1}}
    want = reference(model, "<|user|>ab ab\n<|assistant|>", 12, chat)
    assert texts(post(server, chat, "chat/completions")) == [want]


def test_batched_rows_each_with_their_own_settings(held, model) -> None:
    """Requests admitted together: one prefill of the budget, decode steps of all rows together,
    each row with its own settings, each answer its in-process solo run."""
    settings = [
        {"temperature": 0},
        {"temperature": 0, "logit_bias": {str(A): 100}},
        {"temperature": 0, "presence_penalty": 2, "frequency_penalty": 1},
        {"temperature": 0, "repetition_penalty": 1.8},
        {"temperature": 0.8, "seed": 1, "top_k": 3},
        {"temperature": 0.8, "seed": 2, "min_p": 0.25, "frequency_penalty": 0.5},
        {"temperature": 1.0, "seed": 3, "top_k": 1},
        {"temperature": 0.9, "seed": 4, "top_p": 0.8, "logit_bias": {"73": -5, "133": 1}},
    ]
    bodies = [{"model": "full", "prompt": f"row {i} ab ab", "max_tokens": 10 + i} | s for i, s in enumerate(settings)]
    outs = admitted_together(held, bodies)
    for body, out in zip(bodies, outs, strict=True):
        assert text_of(out) == reference(model, body["prompt"], body["max_tokens"], body), body
    assert text_of(outs[1]) == "A" * 11
    snap = held[0].health()["scheduler"]
    assert snap["prefills"] == len(bodies) and snap["multi_row_steps"] > 0 and snap["max_rows"] == len(bodies)


def test_schedules_and_speculative_requests_honour_the_fields(held, model) -> None:
    fields = [
        {"temperature": 0, "frequency_penalty": 1.5, "logit_bias": {"73": 1}},
        {"temperature": 0, "repetition_penalty": 1.6},
        {"temperature": 0.9, "seed": 5, "top_k": 4, "min_p": 0.1, "presence_penalty": 0.5},
    ]
    bodies = []
    for i, f in enumerate(fields):
        bodies.append({"model": "auto", "prompt": f"t{i} q", "max_tokens": 16, "budget_schedule": SCHED} | f)
        bodies.append({"model": "full", "prompt": f"s{i} ab ab", "max_tokens": 14} | SPEC | f)
    bodies.append({"model": "full", "prompt": "s9 ab ab", "max_tokens": 14, "temperature": 0} | SPEC)  # none
    outs = admitted_together(held, bodies)
    for body, out in zip(bodies, outs, strict=True):
        want = reference(model, body["prompt"], body["max_tokens"], body)
        assert text_of(out) == want, body
        if "draft_budget" in body and body["temperature"] == 0:  # speculative greedy: the target's own output
            plain = {k: v for k, v in body.items() if k not in SPEC}
            assert want == reference(model, body["prompt"], body["max_tokens"], plain)
    for body in bodies[:4]:  # teeth: the fields change what these requests generate
        bare = {k: v for k, v in body.items() if k not in SHAPING}
        assert reference(model, body["prompt"], body["max_tokens"], bare) != text_of(outs[bodies.index(body)])
    snap = held[0].health()["scheduler"]
    # a call per plan: the fields are part of it
    assert snap["several_calls"] == 7 and snap["several_requests"] == 7
