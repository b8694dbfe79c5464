"""The ``nestlm`` subcommands that use a model: eval, harness, demo, serve (generate: ``cli_generate``).

``nestlm/cli.py`` holds the dispatch table and the commands that make models (importance, prune,
train, slice, data, export-checkpoint); both share ``cli_common``.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import COMPILE_HELP, NO_PROGRESS_HELP, _tokens_for, load_tokenizer
from .errors import NestlmError


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
    if (out / "eval.json").is_file() and not args.overwrite:  # as every other command: nothing replaced unasked
        raise NestlmError(f"--out {out} already holds a report; pass --overwrite to replace it, or choose a new --out")
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
        tokens = _tokens_for(args.model, args.data, args.max_bytes, model.config.vocab_size)
    total = model.num_parameters()
    rows = []
    for b in budgets:
        n = model.num_parameters(budget=b)
        row = {"name": b or "model", "kind": "elastic" if b else "model", "params": n, "fraction": n / total}
        if args.data != "none":
            ppl = perplexity(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size, budget=b)
            row.update(loss=ppl["loss"], ppl=ppl["ppl"])
        if args.data == "reasoning":
            acc = reasoning_accuracy(model, tok, n=args.num_reasoning, budget=b, progress=not args.no_progress)
            row.update(accuracy=acc["accuracy"], accuracy_ci=list(acc["ci95"]), accuracy_n=acc["n"])
            row["correct"] = acc["correct"]  # each problem's outcome: paired comparisons of two reports
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
    p.add_argument("--model", required=True, help="model directory (elastic, plain, sliced or Hugging Face)")
    p.add_argument("--budget", default="all", help="a budget name, or 'all'")
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
    p.add_argument("--overwrite", action="store_true", help="replace the report --out already holds (all or none)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence of the perplexity")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass of the perplexity")
    p.add_argument("--num-problems", type=int, default=600, help="held-out problems for perplexity (reasoning)")
    p.add_argument(
        "--num-reasoning",
        type=int,
        default=200,
        help="held-out problems solved by greedy decoding (reasoning; the README's tables use 200)",
    )
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this much held-out text")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
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
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument("overrides", nargs="*", help="key=value overrides of nestlm/recipes/demo.yaml, e.g. train.lr=2e-4")
    p.set_defaults(func=cmd_demo)


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .serve.server import API_KEY_ENV, access_log_to_stderr, bind, build_api, run, url_of

    for name in ("port", "max_batch", "max_queue", "max_context"):
        v = getattr(args, name)
        if v is not None and (v < (0 if name == "port" else 1) or (name == "port" and v > 65535)):
            raise NestlmError(
                f"--{name.replace('_', '-')} must be {'in [0, 65535]' if name == 'port' else '>= 1'}, got {v}"
            )
    if args.target_latency_ms <= 0:
        raise NestlmError(f"--target-latency-ms must be > 0, got {args.target_latency_ms}")
    sock = bind(args.host, args.port)  # a taken port is one line, before the model loads
    try:
        api = build_api(
            args.model,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            max_context=args.max_context,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            target_latency_ms=args.target_latency_ms,
            device=args.device,
            compile=args.compile,
            log_prompts=args.log_prompts,
            chat_template=args.chat_template,
        )
    except BaseException:
        sock.close()
        raise
    url = url_of(sock)

    def ready() -> None:  # the socket listens and the scheduler runs
        models = ", ".join(api.ids)
        print(
            f"nestlm serve: serving on {url}/v1  models: {models} (and auto); metrics: {url}/metrics", file=sys.stderr
        )
        sys.stderr.flush()

    access_log_to_stderr()
    run(api, sock=sock, on_ready=ready)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server: every budget from one copy of the weights")
    p.add_argument("--model", required=True, help="model directory (elastic, plain, sliced or Hugging Face)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0: any free port (the line it prints names it)")
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
    p.add_argument(
        "--log-prompts",
        action="store_true",
        help="put each request's prompt or messages in its access-log line (stderr); off: counts and timings only",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="Jinja file rendering /v1/chat/completions messages (default: the model directory's own template)",
    )
    p.set_defaults(func=cmd_serve)
