"""The ``nestlm`` subcommands that use a model: generate, eval, harness, demo, serve.

``nestlm/cli.py`` holds the dispatch table and the commands that make models (importance, prune,
train, slice, data, export-checkpoint); both share ``cli_common``.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import COMPILE_HELP, MODEL_DIR_HELP, _tokens_for, load_tokenizer
from .errors import NestlmError


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .loading import load

    _check_sampling_args(args)
    model = load(args.model).eval()
    if args.compile:
        from .compiler import compile_model

        compile_model(model)
    tok = load_tokenizer(args.model)
    ids = torch.tensor([tok.encode(args.prompt)], dtype=torch.long)
    if ids.numel() == 0:
        raise NestlmError("the prompt is empty after tokenization; give some text with --prompt")
    if int(ids.max()) >= model.config.vocab_size:
        raise NestlmError(
            f"the tokenizer in {args.model} gives token id {int(ids.max())}, beyond the model's vocabulary "
            f"of {model.config.vocab_size}; the tokenizer does not belong to this model"
        )
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


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Every numeric option in its range, before any work: one line naming the option, the value and the range."""
    checks = [
        ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "an integer >= 1"),
        ("--temperature", args.temperature, 0 <= args.temperature < float("inf"), "0 (greedy) or a positive number"),
        ("--top-k", args.top_k, args.top_k is None or args.top_k >= 1, "an integer >= 1"),
        ("--top-p", args.top_p, args.top_p is None or 0 < args.top_p <= 1, "in (0, 1]"),
        ("--seed", args.seed, 0 <= args.seed < 2**64, "an integer in [0, 2**64)"),
    ]
    for name, value, ok, valid in checks:
        if not ok:
            raise NestlmError(f"{name} {value} is out of range: give {valid}")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help=MODEL_DIR_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--budget", default=None, help="budget name of an elastic checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate, >= 1 (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_generate)


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval.evaluate import reasoning_accuracy, reasoning_tokens
    from .eval.perplexity import perplexity
    from .eval.report import print_table, write_report
    from .loading import load
    from .tokenizer import ByteTokenizer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NestlmError(f"--out {out} is a file; give a directory for the report")
    if args.data not in ("reasoning", "stdlib", "none") and not Path(args.data).exists():
        raise NestlmError(f"--data {args.data} does not exist; give a text file, directory, .jsonl, or 'reasoning'")
    harness = None
    if args.tasks:  # lm-evaluation-harness tasks: checked (installed, known) before any work
        from .eval.harness_run import TaskRunner

        harness = TaskRunner.from_args(args)
    model = load(args.model).eval()
    if args.budget in (None, "all"):
        budgets = model.budgets or [None]
    else:
        model.resolve_arch(budget=args.budget)  # an unknown name lists the known ones
        budgets = [args.budget]
    tok = load_tokenizer(args.model, required=False) or ByteTokenizer()
    if args.data == "reasoning":
        tokens = reasoning_tokens(tok, args.num_problems)
    elif args.data != "none":
        tokens = _tokens_for(args.model, args.data, args.max_bytes)
    total = model.num_parameters()
    rows = []
    for b in budgets:
        n = model.num_parameters(budget=b)
        row = {"name": b or "model", "kind": "elastic" if b else "model", "params": n, "fraction": n / total}
        if args.data != "none":
            ppl = perplexity(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size, budget=b)
            row.update(loss=ppl["loss"], ppl=ppl["ppl"])
        if args.data == "reasoning":
            row["accuracy"] = reasoning_accuracy(model, tok, n=args.num_reasoning, budget=b)["accuracy"]
        if harness is not None:
            row["tasks"] = harness.scores(model, args.model, b)
        rows.append(row)
    extra = {"model": args.model, "data": args.data, **(harness.describe() if harness else {})}
    paths = write_report(rows, out, extra=extra, title=f"nestlm eval: {args.model}")
    print_table(rows, title=f"{args.model} on {args.data}")
    print(f"report: {paths['markdown']}  json: {paths['json']}  plot: {paths['plot']}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity, reasoning accuracy and lm-evaluation-harness tasks per budget")
    p.add_argument("--model", required=True)
    p.add_argument("--budget", default="all", help="a budget name, or 'all' (default)")
    p.add_argument(
        "--data",
        default="reasoning",
        help="held-out text (file, dir, .jsonl), 'reasoning' (synthetic, test seeds) or 'none' (tasks only)",
    )
    p.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, comma-separated (needs .[eval])")
    p.add_argument("--limit", type=float, default=None, help="harness: documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="harness: few-shot examples per prompt")
    p.add_argument("--include-path", default=None, help="harness: a directory of local task YAML files")
    p.add_argument("--apply-chat-template", action="store_true", help="harness: prompts through the chat template")
    p.add_argument("--out", default="nestlm-eval", help="directory for eval.json, report.md and quality.png")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-problems", type=int, default=600, help="held-out problems for perplexity (reasoning)")
    p.add_argument("--num-reasoning", type=int, default=64, help="problems solved by greedy decoding (reasoning)")
    p.add_argument("--max-bytes", type=int, default=None)
    p.set_defaults(func=cmd_eval)


def cmd_harness(args: argparse.Namespace) -> int:
    from .harness import main as harness_main

    return harness_main([])  # main() passes `nestlm harness ARGS...` on before parsing; here only via a parser


def _add_harness(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "harness", help="lm-evaluation-harness's own command line with the nestlm backend (arguments passed through)"
    )
    p.set_defaults(func=cmd_harness)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress, overrides=args.overrides)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end run on the shipped parent (CPU, minutes)")
    p.add_argument("--out", default="nestlm-demo", help="new directory for everything the demo writes")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not the real numbers)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of nestlm/recipes/demo.yaml, e.g. train.lr=2e-4")
    p.set_defaults(func=cmd_demo)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .serve.server import API_KEY_ENV, build_api, run

    for name in ("port", "max_batch", "max_queue", "max_context"):
        v = getattr(args, name)
        if v is not None and (v < (0 if name == "port" else 1) or (name == "port" and v > 65535)):
            raise NestlmError(
                f"--{name.replace('_', '-')} must be {'in [0, 65535]' if name == 'port' else '>= 1'}, got {v}"
            )
    if args.target_latency_ms <= 0:
        raise NestlmError(f"--target-latency-ms must be > 0, got {args.target_latency_ms}")
    api = build_api(
        args.model,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_context=args.max_context,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        target_latency_ms=args.target_latency_ms,
        device=args.device,
        compile=args.compile,
    )
    print(f"nestlm serve: http://{args.host}:{args.port}/v1  models: {', '.join(api.ids)} (and auto)", file=sys.stderr)
    run(api, host=args.host, port=args.port)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: every budget from one copy of the weights")
    p.add_argument("--model", required=True, help="model directory (elastic, plain, sliced or Hugging Face)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $NESTLM_API_KEY)")
    p.add_argument(
        "--max-context", type=int, default=None, help="prompt + output tokens (default: the config's, or 4096)"
    )
    p.add_argument("--max-batch", type=int, default=32, help="requests decoding at once, over all budgets")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot; beyond it: HTTP 429")
    p.add_argument(
        "--target-latency-ms", type=float, default=100.0, help='per-token latency target of model "auto" (ms)'
    )
    p.add_argument("--device", default="cpu", help="torch device of the weights (cpu, cuda)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_serve)
