"""The ``nestlm`` command: one dispatch table from subcommand to function.

Expected errors (bad paths, bad configs, unknown budgets) print one line
``nestlm: error: ...`` and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import NestlmError


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load
    from .tokenizer import load_tokenizer

    model = load(args.model).eval()
    tok = load_tokenizer(args.model)
    ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    if ids.numel() == 0:
        raise NestlmError("the prompt is empty after tokenization; give some text with --prompt")
    out = model.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_k=args.top_k,
        top_p=args.top_p,
        budget=args.budget,
        seed=args.seed,
    )
    print(tok.decode(out[0, ids.shape[1] :].tolist()))
    return 0


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help="nestlm or Hugging Face NemotronH model directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--budget", default=None, help="budget name of an elastic checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


# subcommand -> function that adds its parser; each parser sets func=...
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "generate": _add_generate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestlm",
        description="Train one hybrid Mamba-Attention LM with smaller models nested inside it; slice or serve any of them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NestlmError as e:
        print(f"nestlm: error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # unknown budget names and the like carry their message in args[0]
        if e.args and isinstance(e.args[0], str) and " " in e.args[0]:
            print(f"nestlm: error: {e.args[0]}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("nestlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
