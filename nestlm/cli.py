"""The ``nestlm`` command: one dispatch table from subcommand to function.

Expected errors (bad paths, bad configs, unknown budgets) print one line
``nestlm: error: ...`` and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

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

    from .checkpoint import load

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

    from .train import data as data_mod

    if data != "stdlib" and not data.startswith("reasoning") and not Path(data).exists():
        raise NestlmError(f"data {data} does not exist; give a text file, a directory, .jsonl, .parquet or stdlib")
    needs_tok = not data_mod.is_pretokenized(data)
    tok = load_tokenizer(model_dir, required=needs_tok) if needs_tok else None
    return data_mod.load_tokens(data, tok, max_bytes=max_bytes)


def cmd_importance(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import load, save_pretrained
    from .elastic.importance import estimate_importance, reorder

    _check_out(args.out)
    model = load(args.model).eval()
    tokens = _tokens_for(args.model, args.data, args.max_bytes)
    block = args.seq_len
    n_blocks = tokens.numel() // block
    if n_blocks < 1:
        raise NestlmError(
            f"calibration data {args.data} has {tokens.numel()} tokens, fewer than one sequence of {block}; "
            "give more data or a smaller --seq-len"
        )
    n = min(n_blocks, args.num_samples)
    seqs = tokens[: n * block].view(n, block)
    batches = list(torch.split(seqs, args.batch_size))
    print(f"importance: {n} calibration sequences of {block} tokens from {args.data}")
    imp = estimate_importance(model, batches, depth=not args.no_depth, depth_batches=args.depth_batches)
    reorder(model, imp)
    save_pretrained(model, args.out)
    print(f"reordered checkpoint + importance.json written to {args.out}")
    print(f"layers, least important first: {imp.layer_order}")
    return 0


def _add_importance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("importance", help="rank hidden channels, heads, neurons and layers; reorder the weights")
    p.add_argument("--model", required=True, help=MODEL_DIR_HELP)
    p.add_argument("--data", required=True, help="text file, directory, .jsonl (text or input_ids), .parquet, stdlib")
    p.add_argument("--out", required=True, help="new directory for the reordered checkpoint + importance.json")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-samples", type=int, default=1024, help="calibration sequences (the paper uses 1024)")
    p.add_argument("--depth-batches", type=int, default=4, help="batches used for the iterative depth ranking")
    p.add_argument("--no-depth", action="store_true", help="skip the depth ranking")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")
    p.set_defaults(func=cmd_importance)


def cmd_prune(args: argparse.Namespace) -> int:
    from .checkpoint import load, save_pretrained
    from .elastic.arch import closest_homogeneous, count_parameters, parse_target
    from .elastic.importance import require_reordered
    from .interop import export_hf

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
    from .checkpoint import load, save_pretrained
    from .interop import export_hf

    _check_out(args.out)
    model = load(args.model)
    spec = model.resolve_arch(budget=args.budget)
    small = model.slice(spec)
    if args.format == "hf":
        from .interop import hf_config_dict

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
    p.add_argument("--budget", required=True, help="budget name (see elastic.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["nestlm", "hf"], default="nestlm")
    p.set_defaults(func=cmd_slice)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .train.recipe import load_recipe
    from .train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    out = train(recipe, args.out, resume=args.resume, progress=not args.no_progress)
    elastic = Path(out) / "elastic.json"
    if elastic.is_file():  # the frozen budgets, one line each
        import json

        for name, b in json.loads(elastic.read_text()).items():
            from .elastic.arch import ArchSpec

            desc = ArchSpec.from_dict(b["arch"]).describe()
            print(f"  budget {name:>6}: {b['params']:,} params ({b['fraction']:.1%}; target {b['target']})  {desc}")
    print(f"done: {out} (metrics in {Path(out) / 'metrics.jsonl'})")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="elastic (or plain) training from a YAML recipe")
    p.add_argument(
        "recipe",
        help="recipe YAML path, or the name of a shipped recipe (tiny, nemotron-nano-12b-v2-elastic, qwen3-8b-elastic)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 stages.0.steps=5")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics.jsonl, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import load
    from .eval.evaluate import reasoning_accuracy, reasoning_tokens
    from .eval.perplexity import perplexity
    from .eval.report import print_table, write_report
    from .tokenizer import ByteTokenizer

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NestlmError(f"--out {out} is a file; give a directory for the report")
    if args.data != "reasoning" and not Path(args.data).exists() and args.data != "stdlib":
        raise NestlmError(f"--data {args.data} does not exist; give a text file, directory, .jsonl, or 'reasoning'")
    model = load(args.model).eval()
    if args.budget in (None, "all"):
        budgets = model.budgets or [None]
    else:
        model.resolve_arch(budget=args.budget)  # an unknown name lists the known ones
        budgets = [args.budget]
    tok = load_tokenizer(args.model, required=False) or ByteTokenizer()
    if args.data == "reasoning":
        tokens = reasoning_tokens(tok, args.num_problems)
    else:
        tokens = _tokens_for(args.model, args.data, args.max_bytes)
    total = model.num_parameters()
    rows = []
    for b in budgets:
        n = model.num_parameters(budget=b)
        ppl = perplexity(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size, budget=b)
        row = {
            "name": b or "model",
            "kind": "elastic" if b else "model",
            "params": n,
            "fraction": n / total,
            "loss": ppl["loss"],
            "ppl": ppl["ppl"],
        }
        if args.data == "reasoning":
            row["accuracy"] = reasoning_accuracy(model, tok, n=args.num_reasoning, budget=b)["accuracy"]
        rows.append(row)
    paths = write_report(rows, out, extra={"model": args.model, "data": args.data}, title=f"nestlm eval: {args.model}")
    print_table(rows, title=f"{args.model} on {args.data}")
    print(f"report: {paths['markdown']}  json: {paths['json']}  plot: {paths['plot']}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (and reasoning accuracy) per budget")
    p.add_argument("--model", required=True)
    p.add_argument("--budget", default="all", help="a budget name, or 'all' (default)")
    p.add_argument(
        "--data", default="reasoning", help="held-out text (file, dir, .jsonl) or 'reasoning' (synthetic, test seeds)"
    )
    p.add_argument("--out", default="nestlm-eval", help="directory for eval.json, report.md and quality.png")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-problems", type=int, default=600, help="held-out problems for perplexity (reasoning)")
    p.add_argument("--num-reasoning", type=int, default=64, help="problems solved by greedy decoding (reasoning)")
    p.add_argument("--max-bytes", type=int, default=None)
    p.set_defaults(func=cmd_eval)


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


def _check_out(out: str) -> None:
    from pathlib import Path

    p = Path(out)
    if p.exists() and not p.is_dir():
        raise NestlmError(f"--out {out} is a file; give a directory")
    if p.is_dir() and any(p.iterdir()):
        raise NestlmError(f"--out {out} is not empty; choose a new directory (nothing is overwritten)")


# subcommand -> function that adds its parser; each parser sets func=...
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "importance": _add_importance,
    "prune": _add_prune,
    "train": _add_train,
    "slice": _add_slice,
    "eval": _add_eval,
    "generate": _add_generate,
    "demo": _add_demo,
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
