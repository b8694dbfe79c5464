"""``nestlm generate``: one prompt, its continuation printed (streamed with ``--stream``).

Plain decoding, speculative decoding with a nested draft (``--draft-budget``) or a budget schedule
(``--budget-schedule``), all through ``model.generate``; ``--stop`` strings end the output before
them. Every option is checked before the model loads: a bad value is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_common import COMPILE_HELP, MODEL_DIR_HELP, load_tokenizer
from .errors import NestlmError


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .loading import load

    _check_sampling_args(args)
    prompt = _prompt_of(args)
    stops = [unescape(x) for x in args.stop or []]
    schedule = _schedule_of(args.budget_schedule)
    model = load(args.model).eval()
    if args.compile:
        from .compiler import compile_model

        compile_model(model)
    tok = load_tokenizer(args.model)
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
    if ids.numel() == 0:
        raise NestlmError("the prompt is empty after tokenization; give some text with --prompt")
    if int(ids.max()) >= model.config.vocab_size:
        raise NestlmError(
            f"the tokenizer in {args.model} gives token id {int(ids.max())}, beyond the model's vocabulary "
            f"of {model.config.vocab_size}; the tokenizer does not belong to this model"
        )
    kw: dict = dict(budget=args.budget)
    if schedule is not None:
        from .decoding import parse_schedule
        from .errors import DecodingError

        try:
            parse_schedule(model, schedule)
        except DecodingError as e:
            raise NestlmError(f"--budget-schedule: {e}") from None
        kw = dict(budget_schedule=schedule, tokenizer=tok)
    elif args.draft_budget is not None:
        model.resolve_arch(budget=args.draft_budget)  # an unknown name lists the known ones
        kw |= dict(draft_budget=args.draft_budget, num_draft_tokens=args.num_draft_tokens or 4)
    stream = _Stream(tok, stops) if args.stream else None
    if stream is not None:  # plain decoding reports each step's tokens, the other two decoders each token
        several = schedule is not None or args.draft_budget is not None
        kw |= dict(on_token=stream.token) if several else dict(on_step=stream.step)

    def stop(gen: torch.Tensor) -> torch.Tensor:  # (B, n) new tokens -> (B,) rows that hold a stop string
        return torch.tensor([any(x in tok.decode(row.tolist()) for x in stops) for row in gen])

    out = model.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=stop if stops else None,
        **kw,
    )
    text = _cut(tok.decode(out[0, ids.shape[1] :].tolist()), stops)
    if stream is not None:
        stream.finish(text)
    else:
        print(text)
    return 0


def unescape(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` as a newline, a tab and one backslash; any other backslash stays as typed."""
    out, i = [], 0
    while i < len(text):
        two = text[i : i + 2]
        if two in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[two])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _cut(text: str, stops: list[str]) -> str:
    """``text`` up to the first of the stop strings (all of it when none occurs)."""
    return text[: min([i for i in (text.find(x) for x in stops) if i >= 0], default=len(text))]


class _Stream:
    """Text printed as tokens come, flushed; held back while a stop string may be arriving or the last
    character is an incomplete UTF-8 sequence (U+FFFD), so that the text printed is the final text."""

    def __init__(self, tok: Any, stops: list[str]) -> None:
        self.tok, self.stops, self.ids, self.sent = tok, stops, [], 0
        self.hold = max((len(x) - 1 for x in stops), default=0)
        self.done = False

    def step(self, logits: Any, toks: Any) -> None:  # plain decoding's on_step(logits, tokens (B,))
        self.token(0, int(toks[0]))

    def token(self, row: int, tok: int, *_: Any) -> None:  # a schedule's or speculative decoding's on_token
        if self.done:
            return
        self.ids.append(tok)
        text = self.tok.decode(self.ids)
        cut = _cut(text, self.stops)
        self.done = len(cut) < len(text)
        end = len(cut) if self.done else len(text) - self.hold
        if not self.done and end == len(text) and text.endswith("\ufffd"):
            end -= 1
        if end > self.sent:
            sys.stdout.write(cut[self.sent : end])
            sys.stdout.flush()
            self.sent = end

    def finish(self, text: str) -> None:
        sys.stdout.write(text[self.sent :] + "\n")
        sys.stdout.flush()


def _prompt_of(args: argparse.Namespace) -> str:
    """The prompt: --prompt with its escapes read, or the text of --prompt-file (- for stdin) as it is."""
    from pathlib import Path

    if (args.prompt is None) == (args.prompt_file is None):
        raise NestlmError("give exactly one of --prompt TEXT and --prompt-file PATH")
    if args.prompt is not None:
        return unescape(args.prompt)
    if args.prompt_file == "-":
        return sys.stdin.read()
    path = Path(args.prompt_file)
    if not path.is_file():
        raise NestlmError(f"--prompt-file {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NestlmError(f"--prompt-file {path} cannot be read as UTF-8 text: {e}") from None


def _schedule_of(text: str | None) -> list | None:
    """--budget-schedule as JSON: a non-empty list of phase objects (their fields are checked against the model)."""
    import json

    if text is None:
        return None
    try:
        sched = json.loads(text)
    except ValueError as e:
        raise NestlmError(
            f"--budget-schedule is not valid JSON ({e}); give a list such as {SCHEDULE_EXAMPLE}"
        ) from None
    if not isinstance(sched, list) or not sched or not all(isinstance(ph, dict) for ph in sched):
        raise NestlmError(f"--budget-schedule must be a non-empty JSON list of phase objects, e.g. {SCHEDULE_EXAMPLE}")
    return sched


SCHEDULE_EXAMPLE = """'[{"budget": "50", "stop": "</think>", "max_tokens": 512}, {"budget": "full"}]'"""


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Every numeric option in its range, and the options that exclude each other, before any work: one line
    naming the option, the value and the range."""
    k = args.num_draft_tokens
    checks = [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an integer >= 1"),
        ("--temperature", args.temperature, 0 <= args.temperature < float("inf"), "0 (greedy) or a positive number"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "an integer >= 1"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
        ("--num-draft-tokens", k, k is None or 1 <= k <= MAX_DRAFT_TOKENS, f"an integer in [1, {MAX_DRAFT_TOKENS}]"),
    ]
    for name, value, ok, valid in checks:
        if not ok:
            raise NestlmError(f"{name} {value} is out of range: give {valid}")
    if any(not x for x in args.stop or []):
        raise NestlmError("--stop '' is empty: give a non-empty stop string")
    if k is not None and args.draft_budget is None:
        raise NestlmError("--num-draft-tokens needs --draft-budget NAME (the nested draft model)")
    if args.budget_schedule is not None and (args.budget is not None or args.draft_budget is not None):
        other = "--budget" if args.budget is not None else "--draft-budget"
        raise NestlmError(f"--budget-schedule names the budget of each phase; it does not combine with {other}")


MAX_DRAFT_TOKENS = 64


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description=r"Generate text from a prompt. In --prompt and --stop, \n is a newline, \t a tab and \\ one "
        "backslash (any other backslash stays as typed); --prompt-file is read as it is.",
    )
    p.add_argument("--model", required=True, help=MODEL_DIR_HELP)
    p.add_argument("--prompt", default=None, help=r"the prompt text; \n, \t and \\ are read as escapes")
    p.add_argument(
        "--prompt-file", default=None, help="read the prompt from this file (- for stdin), instead of --prompt"
    )
    p.add_argument("--budget", default=None, help="budget name of an elastic checkpoint (default: the full model)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate, >= 1")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy, > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="STR",
        help=r"end the output before this text (repeatable; escapes as in --prompt, e.g. '\n\n')",
    )
    p.add_argument(
        "--draft-budget",
        default=None,
        metavar="NAME",
        help="speculative decoding: a smaller nested budget drafts, --budget verifies (the output is --budget's)",
    )
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        metavar="K",
        help=f"tokens the draft proposes per step, 1..{MAX_DRAFT_TOKENS} (default 4 with --draft-budget)",
    )
    p.add_argument(
        "--budget-schedule",
        default=None,
        metavar="JSON",
        help="phases at different budgets, as model.generate's budget_schedule, e.g. " + SCHEDULE_EXAMPLE,
    )
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (the same final text)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_generate)
