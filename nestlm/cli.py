"""The ``nestlm`` command: one dispatch table from subcommand to function.

Expected errors (bad paths, bad configs, unknown budgets) print one line
``nestlm: error: ...`` and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from .checkpoint import ELASTIC_FILE, IMPORTANCE_FILE, require_new_dir
from .errors import NestlmError

MODEL_DIR_HELP = "nestlm or Hugging Face (NemotronH, llama, mistral, qwen2, qwen3) model directory"


def load_tokenizer(model_dir: str, required: bool = True) -> Any:
    """The model directory's tokenizer; an unreadable tokenizer.json is a one-line error, not a traceback."""
    from .tokenizer import load_tokenizer as _load

    try:
        return _load(model_dir, required=required)
    except NestlmError:
        raise
    except Exception as e:  # the tokenizers library raises a bare Exception for a malformed file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NestlmError(f"the tokenizer files in {model_dir} cannot be read: {msg}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .loading import load

    model = load(args.model).eval()
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


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help=MODEL_DIR_HELP)
    p.add_argument("--prompt", required=True)
    p.add_argument("--budget", default=None, help="budget name of an elastic checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)


def _tokens_for(model_dir: str, data: str, max_bytes: int | None = None) -> Any:
    """Token stream of DATA for the model in model_dir (pre-tokenized input_ids need no tokenizer)."""
    from pathlib import Path

    from .train import sources as data_mod

    if data != "stdlib" and not data.startswith("reasoning") and not Path(data).exists():
        raise NestlmError(f"data {data} does not exist; give a text file, a directory, .jsonl, .parquet or stdlib")
    needs_tok = not data_mod.is_pretokenized(data)
    tok = load_tokenizer(model_dir, required=needs_tok) if needs_tok else None
    return data_mod.load_tokens(data, tok, max_bytes=max_bytes)


def cmd_importance(args: argparse.Namespace) -> int:
    from .checkpoint import save_pretrained
    from .elastic.importance import calibration_batches, estimate_importance, pick_device, reorder
    from .loading import load

    _check_out(args.out)
    device = pick_device(args.device, "--device")
    model = load(args.model).eval()
    tokens = _tokens_for(args.model, args.data, args.max_bytes)
    model.to(device)  # forward passes only: the scores are the same on any device, up to float rounding
    batches = calibration_batches(tokens, args.seq_len, args.num_samples, args.batch_size, args.data)
    n = sum(b.shape[0] for b in batches)
    print(f"importance: {n} calibration sequences of {args.seq_len} tokens from {args.data}")
    print(f"importance: on {device}")
    imp = estimate_importance(model, batches, depth=not args.no_depth, depth_batches=args.depth_batches)
    reorder(model.cpu(), imp)
    save_pretrained(model, args.out)
    print(f"reordered checkpoint + {IMPORTANCE_FILE} written to {args.out}")
    print(f"layers, least important first: {imp.layer_order}")
    return 0


def _add_importance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("importance", help="rank hidden channels, heads, neurons and layers; reorder the weights")
    p.add_argument("--model", required=True, help=MODEL_DIR_HELP)
    p.add_argument("--data", required=True, help="text file, directory, .jsonl (text or input_ids), .parquet, stdlib")
    p.add_argument("--out", required=True, help=f"new directory for the reordered checkpoint + {IMPORTANCE_FILE}")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=1024, help="calibration sequences (the paper uses 1024)")
    p.add_argument("--depth-batches", type=int, default=4, help="batches used for the iterative depth ranking")
    p.add_argument("--no-depth", action="store_true", help="skip the depth ranking")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when present")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")
    p.set_defaults(func=cmd_importance)


def cmd_prune(args: argparse.Namespace) -> int:
    from .checkpoint import save_pretrained
    from .elastic.arch import closest_homogeneous, count_parameters, parse_target
    from .elastic.importance import require_reordered
    from .interop.formats import export_hf
    from .loading import load

    _check_out(args.out)
    model = load(args.model)
    require_reordered(model, "nestlm prune")
    target = parse_target(args.budget)
    spec = closest_homogeneous(model.config, target, tolerance=args.tolerance)
    small = model.slice(spec)
    total = count_parameters(model.config)
    n = spec.num_parameters(model.config)
    (export_hf if args.format == "hf" else save_pretrained)(small, args.out)
    print(f"pruned to {spec.describe()}")
    print(f"parameters: {n:,} of {total:,} ({n / total:.2%}; target {target}) -> {args.out}")
    return 0


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="one-shot Minitron-style width pruning to a budget (the baseline)")
    p.add_argument("--model", required=True, help="a reordered model (from nestlm importance)")
    p.add_argument("--budget", required=True, help="0.5 (fraction), 6e9 (parameters) or 12GB (memory)")
    p.add_argument("--out", required=True)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--format", choices=["nestlm", "hf"], default="nestlm")
    p.set_defaults(func=cmd_prune)


def cmd_slice(args: argparse.Namespace) -> int:
    from .checkpoint import save_pretrained
    from .interop.formats import export_hf
    from .loading import load

    _check_out(args.out)
    model = load(args.model)
    spec = model.resolve_arch(budget=args.budget)
    small = model.slice(spec)
    if args.format == "hf":
        from .interop.formats import hf_config_dict

        hf_config_dict(small.config)  # raises a clear error for heterogeneous slices before anything is written
        export_hf(small, args.out)
    else:
        save_pretrained(small, args.out)
    n = sum(p.numel() for p in small.parameters())
    print(f"budget {args.budget}: {spec.describe()}")
    print(f"{n:,} parameters -> {args.out} ({args.format} format)")
    return 0


def _add_slice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slice", help="cut one budget out of an elastic checkpoint as a standalone model")
    p.add_argument("--model", required=True, help="elastic checkpoint directory")
    p.add_argument("--budget", required=True, help=f"budget name (see {ELASTIC_FILE})")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["nestlm", "hf"], default="nestlm")
    p.set_defaults(func=cmd_slice)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import read_budgets
    from .train.recipe import load_recipe
    from .train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:  # the memory plan only: nothing is allocated, loaded or written
        from .train.plan import format_plan

        if args.world_size is not None and args.world_size < 1:
            raise NestlmError(f"--world-size must be >= 1, got {args.world_size}")
        print(format_plan(recipe, args.world_size or int(os.environ.get("WORLD_SIZE", "1"))))
        return 0
    if args.out is None:
        raise NestlmError("nestlm train needs --out DIR (only --dry-run runs without one)")
    out = train(recipe, args.out, resume=args.resume, progress=not args.no_progress)
    for name, b in read_budgets(out).items():  # the frozen budgets, one line each
        desc = b.arch.describe()
        print(f"  budget {name:>6}: {b.params:,} params ({b.fraction:.1%}; target {b.target})  {desc}")
    print(f"done: {out} (metrics in {Path(out) / 'metrics.jsonl'})")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="elastic (or plain) training from a YAML recipe")
    p.add_argument(
        "recipe",
        help="recipe YAML path, or the name of a shipped recipe (tiny, nemotron-nano-12b-v2-elastic, qwen3-8b-elastic)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 stages.0.steps=5")
    p.add_argument("--out", default=None, help="output directory (checkpoints, metrics.jsonl, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-rank memory plan of every stage (built on the meta device) and exit; needs no --out",
    )
    p.add_argument(
        "--world-size", type=int, default=None, help="ranks the --dry-run plans for (default: $WORLD_SIZE or 1)"
    )
    p.set_defaults(func=cmd_train)


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

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end run on the shipped parent (CPU, minutes)")
    p.add_argument("--out", default="nestlm-demo", help="new directory for everything the demo writes")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test, not the real numbers)")
    p.add_argument("--no-progress", action="store_true")
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
    p.set_defaults(func=cmd_serve)


def _check_out(out: str) -> None:
    require_new_dir(out, "--out")


# subcommand -> function that adds its parser; each parser sets func=...
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "importance": _add_importance,
    "prune": _add_prune,
    "train": _add_train,
    "slice": _add_slice,
    "eval": _add_eval,
    "generate": _add_generate,
    "harness": _add_harness,
    "demo": _add_demo,
    "serve": _add_serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nestlm",
        description=(
            "Train one hybrid Mamba-Attention LM with smaller models nested inside it; slice or serve any of them."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:  # every argument belongs to the harness's own parser
        from .harness import main as harness_main

        return harness_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options: `nestlm train R --out D train.lr=1e-3`
        if getattr(args, "command", None) == "train" and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except NestlmError as e:
        print(f"nestlm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nestlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
