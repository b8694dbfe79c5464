"""The server's request side: prompts, messages and the chat template, every field validated
(nestlm.serve.validate; OpenAI-shaped errors), and :class:`Api`, which turns a validated request
into scheduler requests: ``n`` of them per prompt.

No request field names a file: nothing here reads or writes one but the model directory's
own tokenizer config, read once at start.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import Metrics
from .scheduler import QueueFull, Scheduler
from .scheduler import Request as GenRequest
from .validate import (
    MESSAGE_KEYS,
    ApiError,
    check_fields,
    choice_seed,
    is_int,
    logprobs_field,
    n_field,
    sampling_fields,
    seed_field,
    several_fields,
    stop_field,
    stream_fields,
)

__all__ = ["Api", "ApiError", "Params", "load_chat_template"]
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def load_chat_template(model_dir: str | Path | None) -> str | None:
    """The chat template of a model directory (``tokenizer.chat_template_of``: transformers' order)."""
    from ..tokenizer import chat_template_of

    return chat_template_of(model_dir)


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


@dataclass
class Params:
    """A validated generation request: prompts as token ids and every sampling field. Choice i is
    choice i % n of prompt i // n."""

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
    several: dict[str, Any] | None = None  # budget_schedule / draft_budget + num_draft_tokens, for generate
    n: int = 1
    sampling: dict[str, Any] = field(default_factory=dict)  # top_k, min_p, logit_bias, the penalties

    def prompt_of(self, i: int) -> int:
        """The prompt index of choice i."""
        return i // self.n


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
        log_prompts: bool = False,
        chat_template: str | None = None,
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
        self.chat_template = chat_template or load_chat_template(model_dir)  # `serve --chat-template` first
        self.special = _special_tokens(model_dir)
        self.created = int(time.time())
        self.metrics = Metrics(scheduler, self.ids, None if self.budgets else served_name, log_prompts)

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
        elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
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
            elif isinstance(p, list) and all(is_int(t) for t in p):
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

    def chat_prompt(self, messages: Any, template_kwargs: Any = None) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
            extra = [k for k, v in m.items() if k not in MESSAGE_KEYS and v not in (None, [])]
            if extra:  # tool_calls, tool_call_id, audio, ...: not implemented, so not accepted
                raise ApiError(
                    400, f"messages[{i}].{extra[0]} is not supported by this server", f"messages[{i}].{extra[0]}"
                )
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
            msg = {"role": role, "content": content}
            name = m.get("name")
            if name is not None:
                if not isinstance(name, str):
                    raise ApiError(400, f"messages[{i}].name must be a string", f"messages[{i}].name")
                msg["name"] = name  # the chat template decides what it shows
            clean.append(msg)
        if self.chat_template is None:
            raise ApiError(
                400,
                "this model has no chat template (none in its tokenizer_config.json or chat_template.jinja); "
                "start the server with --chat-template FILE, or use /v1/completions",
                "messages",
                "no_chat_template",
            )
        if template_kwargs is None:
            template_kwargs = {}
        if not isinstance(template_kwargs, dict) or not all(isinstance(k, str) for k in template_kwargs):
            raise ApiError(400, "'chat_template_kwargs' must be an object of named values", "chat_template_kwargs")
        from transformers.utils.chat_template_utils import render_jinja_template

        kw = {**self.special, **template_kwargs}  # e.g. {"enable_thinking": false}, as vLLM passes them
        kw.pop("conversations", None), kw.pop("chat_template", None)
        kw.setdefault("add_generation_prompt", True)
        try:
            rendered, _ = render_jinja_template(conversations=[clean], chat_template=self.chat_template, **kw)
        except Exception as e:  # a template may raise on a conversation it does not accept
            raise ApiError(400, f"the chat template rejects these messages: {e}", "messages") from None
        ids = self.encode(rendered[0])
        if not ids:
            raise ApiError(400, "the chat prompt is empty after tokenization", "messages")
        return ids

    def params(self, body: Any, chat: bool) -> Params:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        check_fields(body, chat)
        model = self.resolve_model(body)
        if chat:
            if "messages" not in body:
                raise ApiError(400, "you must give 'messages'", "messages")
            prompts, texts = [self.chat_prompt(body["messages"], body.get("chat_template_kwargs"))], [None]
        else:
            if "prompt" not in body:
                raise ApiError(400, "you must give 'prompt'", "prompt")
            prompts, texts = self.prompts_of(body["prompt"])
        echo = body.get("echo", False) if not chat else False
        if not isinstance(echo, bool):
            raise ApiError(400, "'echo' must be true or false", "echo")
        n = n_field(body, chat)
        if n * len(prompts) > self.scheduler.max_queue:
            raise ApiError(
                400, f"{n * len(prompts)} choices (prompts times n) exceed the queue of {self.scheduler.max_queue}", "n"
            )
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
        if mt is None:  # the cache grows with what is generated: the default reserves nothing up front
            mt = self.max_context - longest if chat else min(16, self.max_context - longest)
        elif not is_int(mt):
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
        temperature, top_p, sampling = sampling_fields(body, self.vocab)
        stop = stop_field(body)
        seed = seed_field(body)
        stream, include_usage = stream_fields(body)
        logprobs = logprobs_field(body, chat)
        if mt == 0 and stream:
            raise ApiError(400, "max_tokens=0 (echo only) cannot stream", "max_tokens")
        several = several_fields(body, model, self.budgets, self.scheduler.model, self.tok, self.max_context)
        if several is not None and (echo or mt == 0):
            raise ApiError(400, "echo does not combine with budget_schedule or draft_budget", "echo")
        return Params(
            model,
            prompts,
            texts,
            mt,
            temperature,
            top_p,
            stop,
            seed,
            stream,
            include_usage,
            logprobs,
            echo,
            several,
            n,
            sampling,
        )

    # --------------------------------------------------------- running
    def submit(self, p: Params, queue: asyncio.Queue) -> list[GenRequest]:
        """One scheduler request per choice: ``n`` per prompt, choice j seeded with seed + j."""
        loop = asyncio.get_running_loop()
        reqs = []
        for i in range(len(p.prompts) * p.n):

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
                    prompt=p.prompts[p.prompt_of(i)],
                    budget=budget,
                    max_tokens=p.max_tokens,
                    sink=sink,
                    temperature=p.temperature,
                    top_p=p.top_p if p.top_p < 1 else None,
                    seed=choice_seed(p.seed, i % p.n),
                    logprobs=p.logprobs,
                    echo_logprobs=p.echo and p.logprobs is not None,
                    stop=stop_fn,
                    several=p.several,
                    **p.sampling,
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
