"""The OpenAI-compatible HTTP API over a :class:`~nestlm.serve.scheduler.Scheduler`.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /metrics`` (Prometheus),
``POST /v1/completions``, ``POST /v1/chat/completions``; each generation request ends in one access-log
line and in the metrics (nestlm.serve.metrics).
Every request is validated, field by field, before anything reaches the model
(nestlm.serve.validate); a bad one gets a 4xx with an OpenAI-shaped body
``{"error": {"message", "type", "param", "code"}}`` and the server keeps serving. A request that
fails later (an error event of the scheduler) gets a 500 of the same shape; so does anything
unforeseen here. A client never waits on a scheduler that has died. No request field names a
file: nothing here reads or writes one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import Api, ApiError, Params
from .metrics import Record
from .scheduler import Request as GenRequest


@dataclass
class _Choice:
    """The growing output of one choice: tokens, logprobs, the text sent so far."""

    ids: list[int] = field(default_factory=list)
    infos: list[Any] = field(default_factory=list)
    prompt_infos: list[Any] | None = None
    finish: str | None = None
    sent: int = 0  # characters of text already streamed
    error: str | None = None


def _cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _ApiKey:
    """ASGI middleware: every path but /health needs ``Authorization: Bearer KEY`` (else 401).

    A plain ASGI class, not ``@app.middleware``: Starlette's BaseHTTPMiddleware wraps ``receive``
    and would end streaming responses early.
    """

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") != "/health":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.want):
                err = ApiError(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key"
                )
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(api: Api) -> FastAPI:
    """The FastAPI application; the scheduler thread runs for the application's lifetime."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        api.scheduler.start()
        yield
        api.scheduler.stop()

    app = FastAPI(title="nestlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code).response()

    if api.api_key is not None:
        app.add_middleware(_ApiKey, key=api.api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "scheduler": api.scheduler.snapshot()}

    def model_card(m: str) -> dict[str, Any]:
        return {
            "id": m,
            "object": "model",
            "created": api.created,
            "owned_by": "nestlm",
            "max_model_len": api.max_context,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in api.ids]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in api.ids:
            known = ", ".join(api.ids)
            msg = f"the model {model_id!r} does not exist; known models: {known} (and 'auto' in requests)"
            return ApiError(404, msg, "model", "model_not_found").response()
        return model_card(model_id)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, kind = api.metrics.exposition()
        return Response(body, media_type=kind)

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None

    async def handle(request: Request, chat: bool):
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        rec = Record("/v1/chat/completions" if chat else "/v1/completions", client)
        resp = await answer(request, chat, rec)
        if not rec.stream:  # a stream is logged and counted when it ends
            rec.status = resp.status_code
            api.metrics.done(rec)
        return resp

    async def answer(request: Request, chat: bool, rec: Record):
        try:
            body = await body_of(request)
            if isinstance(body, dict):
                rec.model = api.metrics.label(body.get("model"))
                rec.prompt = body.get("messages" if chat else "prompt")
            p = api.params(body, chat)
            queue: asyncio.Queue = asyncio.Queue()
            reqs = api.submit(p, queue)
        except ApiError as e:
            rec.error = e.code or e.kind
            return e.response()
        except Exception as e:  # unforeseen: still an OpenAI-shaped answer
            rec.error = "internal_error"
            return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error").response()
        rec.prompt_tokens = sum(len(x) for x in p.prompts)  # as usage counts them
        if p.stream:
            rec.stream = True
            return StreamingResponse(_stream(api, p, reqs, queue, chat, rec), media_type="text/event-stream")
        try:
            return await _complete(api, p, reqs, queue, chat, request, rec)
        except Exception as e:
            for r in reqs:
                r.cancel()
            rec.error = "internal_error"
            return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error").response()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return app


def _apply(ch: _Choice, ev: tuple) -> None:
    kind = ev[0]
    if kind == "token":
        ch.ids.append(ev[1])
        ch.infos.append(ev[2])
    elif kind == "prompt_logprobs":
        ch.prompt_infos = ev[1]
    elif kind == "done":
        ch.finish = ev[1]
    elif kind == "error":
        ch.error, ch.finish = ev[1], "error"


def _usage(p: Params, choices: list[_Choice], reqs: list[GenRequest]) -> dict[str, Any]:
    pt = sum(len(x) for x in p.prompts)
    ct = sum(len(c.ids) for c in choices)
    out: dict[str, Any] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
    if p.several is not None and "draft_budget" in p.several:  # OpenAI's names for predicted outputs
        out["completion_tokens_details"] = {
            "accepted_prediction_tokens": sum(r.accepted for r in reqs),
            "rejected_prediction_tokens": sum(r.rejected for r in reqs),
        }
    return out


def _completion_logprobs(api: Api, p: Params, i: int, ch: _Choice, text_start: int) -> dict[str, Any]:
    toks, lps, tops, offsets = [], [], [], []
    pos = text_start
    pairs = []
    if p.echo and ch.prompt_infos is not None:
        pairs += list(zip(p.prompts[p.prompt_of(i)], ch.prompt_infos, strict=True))
    pairs += list(zip(ch.ids, ch.infos, strict=True))
    for tok, info in pairs:
        s = api.decode([tok])
        toks.append(s)
        offsets.append(pos)
        pos += len(s)
        if info is None:
            lps.append(None)
            tops.append(None)
        else:
            lps.append(info["logprob"])
            tops.append({api.decode([t]): lp for t, lp in info["top"]})
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(api: Api, ch: _Choice) -> dict[str, Any]:
    def entry(tok: int, lp: float) -> dict[str, Any]:
        s = api.decode([tok])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    content = []
    for tok, info in zip(ch.ids, ch.infos, strict=True):
        e = entry(tok, info["logprob"])
        e["top_logprobs"] = [entry(t, lp) for t, lp in info["top"]]
        content.append(e)
    return {"content": content}


async def _collect(
    api: Api, reqs: list[GenRequest], queue: asyncio.Queue, choices: list[_Choice], request: Request | None = None
):
    """Yield (index, event) until every choice is done; cancel them all if the client goes away.

    A stream is cancelled by the server when its client disconnects; a plain request checks
    ``request.is_disconnected()`` while it waits. If the scheduler's thread has died, the choices
    still open end with an error instead of waiting for ever.
    """
    try:
        while any(c.finish is None for c in choices):
            try:
                i, ev = await asyncio.wait_for(queue.get(), timeout=0.25)
            except TimeoutError:
                if request is not None and await request.is_disconnected():
                    return
                if api.scheduler.dead() and queue.empty():
                    for i, c in enumerate(choices):
                        if c.finish is None:
                            ev = ("error", "the scheduler stopped")
                            _apply(c, ev)
                            yield i, ev
                continue
            _apply(choices[i], ev)
            yield i, ev
    finally:
        for r, c in zip(reqs, choices, strict=True):
            if c.finish is None:
                r.cancel()


def _ended(api: Api, p: Params, reqs: list[GenRequest], choices: list[_Choice], rec: Record) -> None:
    """What the access log and the metrics record of a request that ran."""
    rec.budget = api.answered_by(reqs, p)
    rec.completion_tokens = sum(len(c.ids) for c in choices)
    rec.finish = ",".join(dict.fromkeys(c.finish or "cancelled" for c in choices))
    if any(c.error for c in choices):
        rec.error = "internal_error"


async def _complete(
    api: Api, p: Params, reqs: list[GenRequest], queue: asyncio.Queue, chat: bool, request: Request, rec: Record
) -> JSONResponse:
    choices = [_Choice() for _ in reqs]
    async for _ in _collect(api, reqs, queue, choices, request):
        pass
    _ended(api, p, reqs, choices, rec)
    if any(c.finish is None for c in choices):  # the client went away; nobody reads this
        return ApiError(499, "client closed the request", None, "client_closed").response()
    errors = [c.error for c in choices if c.error]
    if errors:  # this request's own failure (the others of its batch went on)
        return ApiError(500, errors[0], None, "internal_error", "server_error").response()
    out = []
    for i, ch in enumerate(choices):
        text, hit = _cut(api.decode(ch.ids), p.stop)
        finish = "stop" if hit else ch.finish
        if chat:
            c: dict[str, Any] = {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": _chat_logprobs(api, ch) if p.logprobs is not None else None,
            }
        else:
            prefix = ""
            if p.echo:
                k = p.prompt_of(i)
                prefix = p.prompt_texts[k] if p.prompt_texts[k] is not None else api.decode(p.prompts[k])
            c = {
                "index": i,
                "text": prefix + text,
                "finish_reason": finish,
                "logprobs": _completion_logprobs(api, p, i, ch, 0) if p.logprobs is not None else None,
            }
        out.append(c)
    body = {
        "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": api.answered_by(reqs, p),
        "choices": out,
        "usage": _usage(p, choices, reqs),
    }
    return JSONResponse(body)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(api: Api, p: Params, reqs: list[GenRequest], queue: asyncio.Queue, chat: bool, rec: Record):
    """_events, logged and counted when the stream ends (a client that went away: status 499)."""
    choices = [_Choice() for _ in reqs]
    try:
        async for ev in _events(api, p, reqs, queue, chat, choices):
            yield ev
    finally:
        _ended(api, p, reqs, choices, rec)
        if any(c.finish is None for c in choices):
            rec.status = 499
        api.metrics.done(rec)


async def _events(
    api: Api, p: Params, reqs: list[GenRequest], queue: asyncio.Queue, chat: bool, choices: list[_Choice]
):
    """Server-sent events: one chunk per piece of text, the finish reason, usage if asked, then [DONE]."""
    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    hold = max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be arriving

    def chunk(i: int, text: str | None, finish: str | None, logprobs: Any = None, role: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            c: dict[str, Any] = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            c = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        body = {"id": cid, "object": obj, "created": created, "model": api.answered_by(reqs, p), "choices": [c]}
        if p.include_usage:
            body["usage"] = None
        return _sse(body)

    stopped = [False] * len(choices)
    if chat:
        for i in range(len(choices)):
            yield chunk(i, "", None, role=True)
    elif p.echo:
        for i in range(len(choices)):
            k = p.prompt_of(i)
            t = p.prompt_texts[k] if p.prompt_texts[k] is not None else api.decode(p.prompts[k])
            yield chunk(i, t, None)
    async for i, ev in _collect(api, reqs, queue, choices):
        ch = choices[i]
        if ev[0] == "error":
            yield _sse(ApiError(500, ev[1], None, "internal_error", "server_error").body())
            continue
        if ev[0] not in ("token", "done") or stopped[i]:
            continue
        text, hit = _cut(api.decode(ch.ids), p.stop)
        final = ev[0] == "done" or hit
        end = len(text) if final else max(ch.sent, len(text) - hold)
        if not final and end > ch.sent and end == len(text) and text[-1] == "\ufffd":
            # only the last character can still change: an incomplete UTF-8 sequence decodes to one U+FFFD
            end -= 1
        piece = text[ch.sent : end]
        lp = None
        if p.logprobs is not None and ev[0] == "token":
            one = _Choice(ids=[ev[1]], infos=[ev[2]])
            lp = _chat_logprobs(api, one) if chat else _completion_logprobs(api, p, i, one, ch.sent)
        if piece or lp is not None:
            yield chunk(i, piece, None, lp)
        ch.sent = end
        if final:
            stopped[i] = True
            yield chunk(i, None if chat else "", "stop" if hit else ch.finish)
            if hit and ch.finish is None:
                reqs[i].cancel()
    if p.include_usage:
        body = {
            "id": cid,
            "object": obj,
            "created": created,
            "model": api.answered_by(reqs, p),
            "choices": [],
            "usage": _usage(p, choices, reqs),
        }
        yield _sse(body)
    yield "data: [DONE]\n\n"
