"""The OpenAI-compatible HTTP API over a :class:`~nestlm.serve.scheduler.Scheduler`.

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``.
Every request is validated here, field by field, before anything reaches the model; a bad one
gets a 4xx with an OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}`` and
the server keeps serving. No request field names a file: nothing here reads or writes one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .scheduler import QueueFull, Scheduler
from .scheduler import Request as GenRequest

MAX_STOPS = 4
MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """A request the API refuses: HTTP status and the OpenAI error fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def load_chat_template(model_dir: str | Path | None) -> str | None:
    """The chat template of a model directory: tokenizer_config.json's ``chat_template`` or chat_template.jinja."""
    if model_dir is None:
        return None
    d = Path(model_dir)
    cfg = d / "tokenizer_config.json"
    if cfg.is_file():
        try:
            t = json.loads(cfg.read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            t = None
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if isinstance(t, str) and t:
            return t
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    return None


def _special_tokens(model_dir: str | Path | None) -> dict[str, str]:
    """bos_token / eos_token strings of tokenizer_config.json, which templates refer to."""
    out: dict[str, str] = {}
    f = Path(model_dir) / "tokenizer_config.json" if model_dir else None
    if f is not None and f.is_file():
        try:
            raw = json.loads(f.read_text())
        except (OSError, ValueError):
            return out
        for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
            v = raw.get(k) if isinstance(raw, dict) else None
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
    return out


# ------------------------------------------------------------------ validation
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Params:
    """A validated generation request: prompts as token ids and every sampling field."""

    model: str
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    max_tokens: int
    temperature: float
    top_p: float | None
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


class Api:
    """Request validation, tokenization and response shapes for one served model."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Any,
        model_dir: str | Path | None,
        max_context: int,
        served_name: str,
        api_key: str | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.tok = tokenizer
        self.model_dir = model_dir
        self.max_context = max_context
        self.api_key = api_key or None
        model = scheduler.model
        self.vocab = model.config.vocab_size
        self.budgets = list(model.budgets)
        self.ids = self.budgets or [served_name]
        self.chat_template = load_chat_template(model_dir)
        self.special = _special_tokens(model_dir)
        self.created = int(time.time())

    # ---------------------------------------------------------- fields
    def resolve_model(self, body: dict[str, Any]) -> str:
        m = body.get("model")
        if m is None:
            raise ApiError(400, "you must give 'model': one of " + ", ".join(self.ids + ["auto"]), "model")
        if not isinstance(m, str):
            raise ApiError(400, f"'model' must be a string, got {type(m).__name__}", "model")
        if m not in self.ids and m != "auto":
            raise ApiError(
                404,
                f"the model {m!r} does not exist; known models: {', '.join(self.ids + ['auto'])}",
                "model",
                "model_not_found",
            )
        return m

    def encode(self, text: str) -> list[int]:
        if self.tok is None:
            raise ApiError(400, "the model directory has no tokenizer; give the prompt as token ids", "prompt")
        return list(self.tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids)) if self.tok is not None else ""

    def prompts_of(self, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
        """A prompt as OpenAI takes it: a string, a list of strings, token ids, or a list of token id lists."""
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string, list of strings, or list of token ids", "prompt")
        ids, texts = [], []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, "'prompt' is empty; give some text", "prompt")
                ids.append(self.encode(p))
                texts.append(p)
            elif isinstance(p, list) and all(_is_int(t) for t in p):
                ids.append(list(p))
                texts.append(None)
            else:
                raise ApiError(
                    400, "'prompt' must be a non-empty string, list of strings, or list of token ids", "prompt"
                )
            if not ids[-1]:
                raise ApiError(400, "'prompt' is empty after tokenization; give some text", "prompt")
            bad = [t for t in ids[-1] if not 0 <= t < self.vocab]
            if bad:
                raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab})", "prompt")
        return ids, texts

    def chat_prompt(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
            role, content = m.get("role"), m.get("content")
            if role not in CHAT_ROLES:
                raise ApiError(
                    400,
                    f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                    f"messages[{i}].role",
                )
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if not all(
                    isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str) for c in content
                ):
                    raise ApiError(400, f"messages[{i}].content parts must be text parts", f"messages[{i}].content")
                content = "".join(c["text"] for c in content)
            if content is None and role == "assistant":
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}].content")
            clean.append({"role": role, "content": content})
        if self.chat_template is None:
            raise ApiError(
                400,
                "this model has no chat template (none in its tokenizer_config.json); use /v1/completions",
                "messages",
                "no_chat_template",
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(
                conversations=[clean], chat_template=self.chat_template, add_generation_prompt=True, **self.special
            )
        except Exception as e:  # a template may raise on a conversation it does not accept
            raise ApiError(400, f"the chat template rejects these messages: {e}", "messages") from None
        ids = self.encode(rendered[0])
        if not ids:
            raise ApiError(400, "the chat prompt is empty after tokenization", "messages")
        return ids

    def params(self, body: Any, chat: bool) -> Params:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = self.resolve_model(body)
        if chat:
            if "messages" not in body:
                raise ApiError(400, "you must give 'messages'", "messages")
            prompts, texts = [self.chat_prompt(body["messages"])], [None]
        else:
            if "prompt" not in body:
                raise ApiError(400, "you must give 'prompt'", "prompt")
            prompts, texts = self.prompts_of(body["prompt"])
        echo = body.get("echo", False) if not chat else False
        if not isinstance(echo, bool):
            raise ApiError(400, "'echo' must be true or false", "echo")
        n = body.get("n", 1)
        if n is not None and (not _is_int(n) or n != 1):
            raise ApiError(400, "only n=1 is supported", "n")

        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        mt = body.get(key)
        longest = max(len(p) for p in prompts)
        if longest > self.max_context:
            raise ApiError(
                400,
                f"the prompt has {longest} tokens; this server's maximum context is {self.max_context}",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        if mt is None:
            mt = self.max_context - longest if chat else min(16, self.max_context - longest)
        elif not _is_int(mt):
            raise ApiError(400, f"'{key}' must be an integer", key)
        elif mt < (0 if echo else 1):
            raise ApiError(400, f"'{key}' must be >= 1 (0 only with echo=true), got {mt}", key)
        if longest + mt > self.max_context:
            raise ApiError(
                400,
                f"prompt ({longest} tokens) + {key} ({mt}) exceeds this server's maximum context of {self.max_context}",
                key,
                "context_length_exceeded",
            )

        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if not _is_num(temperature) or temperature < 0:
            raise ApiError(400, f"'temperature' must be a number >= 0, got {temperature!r}", "temperature")
        top_p = body.get("top_p", 1.0)
        if top_p is None:
            top_p = 1.0
        if not _is_num(top_p) or not 0 < top_p <= 1:
            raise ApiError(400, f"'top_p' must be a number in (0, 1], got {top_p!r}", "top_p")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise ApiError(400, "'seed' must be an integer", "seed")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", "stream")
        so = body.get("stream_options")
        include_usage = False
        if so is not None:
            if not stream:
                raise ApiError(400, "'stream_options' is only allowed with stream=true", "stream_options")
            if not isinstance(so, dict) or not isinstance(so.get("include_usage", False), bool):
                raise ApiError(400, "'stream_options' must be {\"include_usage\": true|false}", "stream_options")
            include_usage = bool(so.get("include_usage", False))
        logprobs: int | None = None
        if chat:
            lp = body.get("logprobs", False)
            if lp is not None and not isinstance(lp, bool):
                raise ApiError(400, "'logprobs' must be true or false", "logprobs")
            top = body.get("top_logprobs")
            if top is not None and (not _is_int(top) or not 0 <= top <= MAX_LOGPROBS):
                raise ApiError(400, f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
            if top is not None and not lp:
                raise ApiError(400, "'top_logprobs' needs logprobs=true", "top_logprobs")
            logprobs = (top or 0) if lp else None
        else:
            lp = body.get("logprobs")
            if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
                raise ApiError(400, f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "logprobs")
            logprobs = lp
        if mt == 0 and stream:
            raise ApiError(400, "max_tokens=0 (echo only) cannot stream", "max_tokens")
        return Params(
            model,
            prompts,
            texts,
            mt,
            float(temperature),
            float(top_p),
            stop,
            seed,
            stream,
            include_usage,
            logprobs,
            echo,
        )

    # --------------------------------------------------------- running
    def submit(self, p: Params, queue: asyncio.Queue) -> list[GenRequest]:
        loop = asyncio.get_running_loop()
        reqs = []
        for i, ids in enumerate(p.prompts):

            def sink(ev: tuple, i: int = i) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, ev))
                except RuntimeError:  # the event loop is gone (server shutting down)
                    pass

            stop_fn = None
            if p.stop:
                stops = p.stop

                def stop_fn(gen: list[int], stops: list[str] = stops) -> bool:
                    text = self.decode(gen)
                    return any(s in text for s in stops)

            budget = None if not self.budgets else p.model
            reqs.append(
                GenRequest(
                    prompt=ids,
                    budget=budget,
                    max_tokens=p.max_tokens,
                    sink=sink,
                    temperature=p.temperature,
                    top_p=p.top_p if p.top_p < 1 else None,
                    seed=p.seed,
                    logprobs=p.logprobs,
                    echo_logprobs=p.echo and p.logprobs is not None,
                    stop=stop_fn,
                )
            )
        try:
            for r in reqs:
                self.scheduler.submit(r)
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise ApiError(429, str(e), None, "queue_full") from None
        return reqs

    def answered_by(self, reqs: list[GenRequest], p: Params) -> str:
        if not self.budgets:
            return self.ids[0]
        return reqs[0].chosen or p.model


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

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": m, "object": "model", "created": api.created, "owned_by": "nestlm"} for m in api.ids]
        return {"object": "list", "data": data}

    async def body_of(request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None

    async def handle(request: Request, chat: bool):
        try:
            p = api.params(await body_of(request), chat)
            queue: asyncio.Queue = asyncio.Queue()
            reqs = api.submit(p, queue)
        except ApiError as e:
            return e.response()
        if p.stream:
            return StreamingResponse(_stream(api, p, reqs, queue, chat), media_type="text/event-stream")
        return await _complete(api, p, reqs, queue, chat, request)

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


def _usage(p: Params, choices: list[_Choice]) -> dict[str, int]:
    pt = sum(len(x) for x in p.prompts)
    ct = sum(len(c.ids) for c in choices)
    return {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}


def _completion_logprobs(api: Api, p: Params, i: int, ch: _Choice, text_start: int) -> dict[str, Any]:
    toks, lps, tops, offsets = [], [], [], []
    pos = text_start
    pairs = []
    if p.echo and ch.prompt_infos is not None:
        pairs += list(zip(p.prompts[i], ch.prompt_infos, strict=True))
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
    reqs: list[GenRequest], queue: asyncio.Queue, choices: list[_Choice], request: Request | None = None
):
    """Yield (index, event) until every choice is done; cancel them all if the client goes away.

    A stream is cancelled by the server when its client disconnects; a plain request checks
    ``request.is_disconnected()`` while it waits.
    """
    try:
        while any(c.finish is None for c in choices):
            if request is None:
                i, ev = await queue.get()
            else:
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
            _apply(choices[i], ev)
            yield i, ev
    finally:
        for r, c in zip(reqs, choices, strict=True):
            if c.finish is None:
                r.cancel()


async def _complete(
    api: Api, p: Params, reqs: list[GenRequest], queue: asyncio.Queue, chat: bool, request: Request
) -> JSONResponse:
    choices = [_Choice() for _ in reqs]
    async for _ in _collect(reqs, queue, choices, request):
        pass
    if any(c.finish is None for c in choices):  # the client went away; nobody reads this
        return ApiError(499, "client closed the request", None, "client_closed").response()
    errors = [c.error for c in choices if c.error]
    if errors:
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
                prefix = p.prompt_texts[i] if p.prompt_texts[i] is not None else api.decode(p.prompts[i])
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
        "usage": _usage(p, choices),
    }
    return JSONResponse(body)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(api: Api, p: Params, reqs: list[GenRequest], queue: asyncio.Queue, chat: bool):
    """Server-sent events: one chunk per piece of text, the finish reason, usage if asked, then [DONE]."""
    cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    choices = [_Choice() for _ in reqs]
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
            t = p.prompt_texts[i] if p.prompt_texts[i] is not None else api.decode(p.prompts[i])
            yield chunk(i, t, None)
    async for i, ev in _collect(reqs, queue, choices):
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
            "usage": _usage(p, choices),
        }
        yield _sse(body)
    yield "data: [DONE]\n\n"
