"""Request fields checked against their real ranges, before anything reaches the scheduler.

A field that OpenAI or vLLM define but this server does not implement (``suffix``, ``tools``,
``response_format``, ``best_of`` other than ``n``, ...) is refused with a 400 naming it, as is a
field neither defines: nothing is accepted and ignored. A field sent as ``null`` counts as not
sent. Every string must be valid Unicode (JSON can carry lone surrogates, which no tokenizer
encodes). Errors are :class:`ApiError`: an HTTP status and OpenAI's error fields.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi.responses import JSONResponse

MAX_STOPS = 4
MAX_LOGPROBS = 20
MAX_DRAFT_TOKENS = 16
MAX_N = 16  # choices per prompt
MAX_PHASES = 8  # phases of a budget_schedule
MAX_LOGIT_BIAS = 300  # entries of logit_bias
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
GREEDY_BELOW = 1e-5  # a smaller temperature is greedy (vLLM's _SAMPLING_EPS)
MAX_TEMPERATURE = 2.0  # OpenAI's range [0, 2]
MAX_BIAS = 100.0  # OpenAI's logit_bias range [-100, 100]
MAX_PENALTY = 2.0  # OpenAI's presence / frequency penalty range [-2, 2]
REPETITION = (0.01, 2.0)  # repetition_penalty (vLLM's; 1 = none)

SHARED = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stream_options"}
SHARED |= {"logprobs", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias"}
SHARED |= {"top_k", "min_p", "repetition_penalty", "budget_schedule", "draft_budget", "num_draft_tokens"}
FIELDS = {
    False: SHARED | {"prompt", "echo", "best_of"},
    True: SHARED | {"messages", "top_logprobs", "chat_template_kwargs"},  # vLLM's: extra variables of the template
}
MESSAGE_KEYS = ("role", "content", "name")


class ApiError(Exception):
    """A request the API refuses: HTTP status and the OpenAI error fields."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_fields(body: dict[str, Any], chat: bool) -> None:
    """Refuse fields this endpoint does not implement, and strings that are not valid Unicode."""
    for k, v in body.items():
        if k not in FIELDS[chat] and v is not None:
            where = "/v1/chat/completions" if chat else "/v1/completions"
            raise ApiError(400, f"'{k}' is not supported by {where} of this server", k, "unsupported_parameter")
    for k, v in body.items():
        stack = [v]
        while stack:  # iterative: a deeply nested value cannot exhaust the recursion limit
            x = stack.pop()
            if isinstance(x, str):
                if not _utf8(x):
                    raise ApiError(400, f"'{k}' holds a string that is not valid Unicode (a lone surrogate)", k)
            elif isinstance(x, dict):
                stack += list(x.keys()) + list(x.values())
            elif isinstance(x, list):
                stack += x


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, open_lo: bool = False) -> float:
    """A number field in [lo, hi] (or (lo, hi]); ``default`` when absent or null."""
    v = body.get(key)
    if v is None:
        return default
    if not is_num(v) or not (lo < v if open_lo else lo <= v) or v > hi:
        rng = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise ApiError(400, f"'{key}' must be a number in {rng}, got {v!r}", key)
    return float(v)


def sampling_fields(body: dict[str, Any], vocab: int) -> tuple[float, float, dict[str, Any]]:
    """(temperature, top_p, the other sampling fields as the scheduler's Request takes them)."""
    temperature = number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    if temperature < GREEDY_BELOW:  # 1e-40 would turn the logits into inf / NaN: greedy, as vLLM does
        temperature = 0.0
    top_p = number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True)
    top_k = body.get("top_k")
    if top_k is not None and (not is_int(top_k) or top_k < -1):
        raise ApiError(400, f"'top_k' must be an integer >= 1, or 0 / -1 for no limit, got {top_k!r}", "top_k")
    min_p = number(body, "min_p", 0.0, 0.0, 1.0)
    extra: dict[str, Any] = {
        "top_k": top_k if top_k is not None and 0 < top_k < vocab else None,
        "min_p": min_p or None,
        "presence_penalty": number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        "frequency_penalty": number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        "repetition_penalty": number(body, "repetition_penalty", 1.0, *REPETITION),
        "logit_bias": logit_bias(body.get("logit_bias"), vocab),
    }
    return temperature, top_p, extra


def logit_bias(raw: Any, vocab: int) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}, ids inside the vocabulary."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or len(raw) > MAX_LOGIT_BIAS:
        raise ApiError(
            400, f"'logit_bias' must be an object of up to {MAX_LOGIT_BIAS} token ids to biases", "logit_bias"
        )
    out = {}
    for k, v in raw.items():
        if not (isinstance(k, str) and re.fullmatch(r"[0-9]{1,12}", k)) or not int(k) < vocab:
            raise ApiError(400, f"logit_bias key {k!r} is not a token id in [0, {vocab})", "logit_bias")
        if not is_num(v) or abs(v) > MAX_BIAS:
            raise ApiError(400, f"logit_bias[{k!r}] must be a number in [-100, 100], got {v!r}", "logit_bias")
        out[int(k)] = float(v)
    return out or None


def seed_field(body: dict[str, Any]) -> int | None:
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
        raise ApiError(400, f"'seed' must be an integer in [-2**63, 2**64 - 1], got {seed!r}", "seed")
    return seed


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of choice j of a prompt: the request's own for the first, then seed + j (wrapping
    inside the 64-bit range the generator takes)."""
    if seed is None or j == 0:
        return seed
    s = seed + j
    return s - 2**64 if s > SEED_MAX else s


def n_field(body: dict[str, Any], chat: bool) -> int:
    n = body.get("n")
    n = 1 if n is None else n
    if not is_int(n) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be an integer in [1, {MAX_N}], got {n!r}", "n")
    best = None if chat else body.get("best_of")
    if best is not None and (not is_int(best) or best != n):
        msg = f"'best_of' other than n is not supported (every choice generated is returned), got {best!r}"
        raise ApiError(400, msg, "best_of")
    return n


def stop_field(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return stop


def stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    so = body.get("stream_options")
    if so is None:
        return stream, False
    if not stream:
        raise ApiError(400, "'stream_options' is only allowed with stream=true", "stream_options")
    if not isinstance(so, dict) or set(so) - {"include_usage"} or not isinstance(so.get("include_usage", False), bool):
        raise ApiError(400, "'stream_options' must be {\"include_usage\": true|false}", "stream_options")
    return stream, bool(so.get("include_usage", False))


def logprobs_field(body: dict[str, Any], chat: bool) -> int | None:
    """Top alternatives per token (0..20), or None for no logprobs."""
    if not chat:
        lp = body.get("logprobs")
        if lp is not None and (not is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
            raise ApiError(400, f"'logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "logprobs")
        return lp
    lp = body.get("logprobs", False)
    if lp is not None and not isinstance(lp, bool):
        raise ApiError(400, "'logprobs' must be true or false", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and (not is_int(top) or not 0 <= top <= MAX_LOGPROBS):
        raise ApiError(400, f"'top_logprobs' must be an integer in [0, {MAX_LOGPROBS}]", "top_logprobs")
    if top is not None and not lp:
        raise ApiError(400, "'top_logprobs' needs logprobs=true", "top_logprobs")
    return (top or 0) if lp else None


def several_fields(
    body: dict[str, Any], model: str, budgets: list[str], lm: Any, tok: Any, max_context: int
) -> dict[str, Any] | None:
    """The extra fields ``budget_schedule``, ``draft_budget``, ``num_draft_tokens`` (as vLLM takes
    extra fields), validated as ``model.generate`` takes them; None when none is given."""
    sched, draft, k = body.get("budget_schedule"), body.get("draft_budget"), body.get("num_draft_tokens")
    if sched is None and draft is None and k is None:
        return None
    if not budgets:
        raise ApiError(400, "this model has no budgets: budget_schedule and draft_budget need an elastic model")
    if sched is not None:
        if draft is not None or k is not None:
            raise ApiError(400, "budget_schedule does not combine with draft_budget", "budget_schedule")
        return {"budget_schedule": _schedule(sched, model, lm, tok, max_context), "tokenizer": tok}
    if draft is None:
        raise ApiError(400, "num_draft_tokens needs draft_budget", "num_draft_tokens")
    if not isinstance(draft, str) or draft not in budgets:
        raise ApiError(
            400, f"'draft_budget' must be one of the budgets {', '.join(budgets)}, got {draft!r}", "draft_budget"
        )
    k = 4 if k is None else k
    if not is_int(k) or not 1 <= k <= MAX_DRAFT_TOKENS:
        raise ApiError(400, f"'num_draft_tokens' must be an integer in [1, {MAX_DRAFT_TOKENS}]", "num_draft_tokens")
    return {"draft_budget": draft, "num_draft_tokens": k}


def _schedule(sched: Any, model: str, lm: Any, tok: Any, max_context: int) -> Any:
    from ..decoding import parse_schedule
    from ..speculative import DecodingError

    def bad(msg: str) -> ApiError:
        return ApiError(400, msg, "budget_schedule")

    if isinstance(sched, list) and len(sched) > MAX_PHASES:
        raise bad(f"a budget_schedule has at most {MAX_PHASES} phases, got {len(sched)}")
    try:
        phases = parse_schedule(lm, sched)
    except DecodingError as e:
        raise bad(str(e)) from None
    names = sorted({ph.budget for ph in phases})
    if model != "auto" and model not in names:
        raise ApiError(
            400, f"'model' {model!r} is not one of the schedule's budgets ({', '.join(names)}) or 'auto'", "model"
        )
    if any(ph.stop or ph.force for ph in phases) and tok is None:
        raise bad("stop and force texts of a budget_schedule need the model's tokenizer")
    for i, ph in enumerate(phases):
        if len(ph.stop) > MAX_STOPS:
            raise bad(f"budget_schedule[{i}].stop has more than {MAX_STOPS} strings")
        if ph.max_tokens is not None and ph.max_tokens > max_context:
            raise bad(f"budget_schedule[{i}].max_tokens exceeds this server's maximum context of {max_context}")
        if ph.force is not None and len(tok.encode(ph.force)) > max_context:
            raise bad(f"budget_schedule[{i}].force is longer than this server's maximum context of {max_context}")
    return sched
