"""The ``nestlm`` command: one dispatch table from subcommand to function.

Expected errors (bad paths, bad configs, unknown budgets) print one line
``nestlm: error: ...`` and exit with status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from .checkpoint import ELASTIC_FILE, IMPORTANCE_FILE, require_new_dir
from .cli_common import MODEL_DIR_HELP, NO_PROGRESS_HELP, Parser, _check_out, _tokens_for, check_option_ranges
from .cli_generate import _add_generate
from .cli_use import _add_demo, _add_eval, _add_harness, _add_serve
from .errors import NestlmError
from .progress import show_progress

PLAN_DOES_NOT_FIT = 3  # `train --dry-run`: exit status when a stage does not fit in --gpu-memory
FORMAT_HELP = "nestlm: safetensors + JSON as nestlm writes them; hf: a Hugging Face directory"


def cmd_importance(args: argparse.Namespace) -> int:
    from .checkpoint import save_pretrained
    from .elastic.importance import calibration_batches, estimate_importance, pick_device, reorder
    from .loading import load

    _check_out(args.out)
    device = pick_device(args.device, "--device")
    model = load(args.model).eval()
    tokens = _tokens_for(args.model, args.data, args.max_bytes, model.config.vocab_size)
    model.to(device)  # forward passes only: the scores are the same on any device, up to float rounding
    batches = calibration_batches(tokens, args.seq_len, args.num_samples, args.batch_size, args.data)
    n = sum(b.shape[0] for b in batches)
    print(f"importance: {n} calibration sequences of {args.seq_len} tokens from {args.data}")
    print(f"importance: on {device}")
    imp = estimate_importance(
        model, batches, depth=not args.no_depth, depth_batches=args.depth_batches, progress=not args.no_progress
    )
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
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward pass")
    p.add_argument("--num-samples", type=int, default=1024, help="calibration sequences (the paper uses 1024)")
    p.add_argument("--depth-batches", type=int, default=4, help="batches used for the iterative depth ranking")
    p.add_argument("--no-depth", action="store_true", help="skip the depth ranking")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when present")
    p.add_argument("--max-bytes", type=int, default=None, help="read at most this much text")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
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
    spec = closest_homogeneous(model.config, target, tolerance=args.tolerance, width_multiple=args.width_multiple)
    small = model.slice(spec)
    total = count_parameters(model.config)
    n = spec.num_parameters(model.config)
    (export_hf if args.format == "hf" else save_pretrained)(small, args.out)
    print(f"pruned to {spec.describe()}")
    print(f"parameters: {n:,} of {total:,} ({n / total:.2%}; target {target}) -> {args.out}")
    if any(ls.kind == "moe" for ls in model.config.layers):
        print(f"active parameters: {spec.active_parameters(model.config):,} per token")
    return 0


def _add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="one-shot Minitron-style width pruning to a budget (the baseline)")
    p.add_argument("--model", required=True, help="a reordered model (from nestlm importance)")
    p.add_argument(
        "--budget",
        required=True,
        help="0.5 (fraction), 6e9 or 6b (parameters), active=2e9 or 23e9,active=2.8e9 (MoE), 12GB (memory)",
    )
    p.add_argument("--out", required=True, help="new directory for the pruned model")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative miss of the budget (default 0.02)")
    p.add_argument(
        "--width-multiple",
        type=int,
        default=8,
        help="channel widths (hidden, MLP, experts) as multiples of this, as kernels take them (default 8; 1: any)",
    )
    p.add_argument("--format", choices=["nestlm", "hf"], default="nestlm", help=FORMAT_HELP)
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
    p.add_argument("--out", required=True, help="new directory for the standalone model")
    p.add_argument("--format", choices=["nestlm", "hf"], default="nestlm", help=FORMAT_HELP)
    p.set_defaults(func=cmd_slice)


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import read_budgets
    from .train.recipe import load_recipe
    from .train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:  # the memory plan only: nothing is allocated, loaded or written
        from .train.plan import RESERVE_GIB, format_plan

        if args.world_size is not None and args.world_size < 1:
            raise NestlmError(f"--world-size must be >= 1, got {args.world_size}")
        if not RESERVE_GIB < args.gpu_memory < float("inf"):
            raise NestlmError(
                f"--gpu-memory {args.gpu_memory} is out of range: give GiB > {RESERVE_GIB} (the plan keeps that spare)"
            )
        world, unfit = args.world_size or int(os.environ.get("WORLD_SIZE", "1")), []
        print(format_plan(recipe, world, gpu_gib=args.gpu_memory, unfit=unfit))
        if unfit:
            stages = ", ".join(unfit)
            print(
                f"nestlm: stage {stages} does not fit in {args.gpu_memory:g} GiB per GPU at world size {world} "
                f"(exit status {PLAN_DOES_NOT_FIT}; see the plan above)",
                file=sys.stderr,
            )
            return PLAN_DOES_NOT_FIT
        return 0
    if args.out is None:
        raise NestlmError("nestlm train needs --out DIR (only --dry-run runs without one)")
    out = train(recipe, args.out, resume=args.resume, progress=show_progress(not args.no_progress))
    for name, b in read_budgets(out).items():  # the frozen budgets, one line each
        desc = b.arch.describe()
        print(f"  budget {name:>6}: {b.params:,} params ({b.fraction:.1%}; target {b.target})  {desc}")
    print(f"done: {out} (metrics in {Path(out) / 'metrics.jsonl'})")
    return 0


def _shipped() -> list[str]:
    from pathlib import Path

    return sorted(p.stem for p in (Path(__file__).resolve().parent / "recipes").glob("*.yaml"))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="elastic (or plain) training from a YAML recipe")
    p.add_argument(
        "recipe",
        help=f"recipe YAML path, or the name of a shipped recipe ({', '.join(_shipped())})",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 stages.0.steps=5")
    p.add_argument("--out", default=None, help="output directory (checkpoints, metrics.jsonl, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the per-rank memory plan of every stage (built on the meta device) and exit; needs no --out. "
        f"Exit status 0 when every stage fits in --gpu-memory, {PLAN_DOES_NOT_FIT} when one does not",
    )
    p.add_argument(
        "--world-size", type=int, default=None, help="ranks the --dry-run plans for (default: $WORLD_SIZE or 1)"
    )
    p.add_argument(
        "--gpu-memory", type=float, default=80.0, metavar="GIB", help="memory of one GPU the --dry-run plans for (GiB)"
    )
    p.set_defaults(func=cmd_train)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from .tokenizer import ByteTokenizer, load_tokenizer
    from .train.chat import ChatFormat
    from .train.shards import prepare

    tok = ByteTokenizer() if args.tokenizer == "bytes" else load_tokenizer(args.tokenizer)
    require_new_dir(args.out, "--out")
    chat = ChatFormat(args.tokenizer, args.chat_template)
    meta = prepare(
        args.inputs, args.out, tok, args.tokenizer, args.max_bytes, args.num_problems, args.seed, args.loss, chat
    )
    spans = f", {meta['spans']:,} trained spans" if meta.get("spans") else ""
    print(
        f"prepared {args.out}: {meta['tokens']:,} tokens ({meta['dtype']}) in {meta['documents']:,} documents{spans} "
        f"from {', '.join(meta['sources'])}; train on it with data.train={args.out}"
    )
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from .tokenizer import ByteTokenizer, load_tokenizer
    from .train.show import show

    tok = ByteTokenizer() if args.tokenizer == "bytes" else load_tokenizer(args.tokenizer)
    pad = getattr(tok, "pad_token_id", None) or 0
    for line in show(args.source, tok, args.tokenizer, args.rows, args.loss, args.chat_template, args.seq_len, pad):
        print(line)
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="data tools: `data prepare` tokenizes once into memory-mapped token shards, `data show` marks"
    )
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = dsub.add_parser("prepare", help="tokenize sources once into a memory-mapped token shard directory")
    q.add_argument(
        "inputs", nargs="+", help="sources as data.train takes them: files, directories, stdlib, reasoning:*"
    )
    q.add_argument("--out", required=True, help="new directory to write (appears only when complete)")
    q.add_argument("--tokenizer", required=True, help="'bytes', or a model directory holding tokenizer.json")
    q.add_argument("--max-bytes", type=int, default=None, help="cap on the text read per source")
    q.add_argument("--num-problems", type=int, default=20000, help="problems per reasoning:* source")
    q.add_argument("--seed", type=int, default=0, help="seed of the reasoning:* problems (as data.seed)")
    q.add_argument("--chat-template", default=None, help="Jinja file rendering conversations (as data.chat_template)")
    q.add_argument(
        "--loss",
        choices=("completion", "last_turn", "all"),
        default="completion",
        help="trained spans kept of conversations and prompt/completion records (completion: every assistant turn)",
    )
    q.set_defaults(func=cmd_data_prepare)
    s = dsub.add_parser("show", help="rows as text with the trained spans marked, and the trained/ignored counts")
    s.add_argument("source", help="a source as data.train takes it, or a directory from `data prepare`")
    s.add_argument("--tokenizer", required=True, help="'bytes', or a model directory holding tokenizer.json")
    s.add_argument("--rows", type=int, default=3, help="rows to print (default 3)")
    s.add_argument("--loss", choices=("completion", "last_turn", "all"), default=None, help="as data.loss")
    s.add_argument("--chat-template", default=None, help="Jinja file rendering conversations (as data.chat_template)")
    s.add_argument("--seq-len", type=int, default=None, help="show rows packed as packing: rows packs them")
    s.set_defaults(func=cmd_data_show)


def cmd_export_checkpoint(args: argparse.Namespace) -> int:
    from .train.export import export_checkpoint

    _check_out(args.out)
    budgets = export_checkpoint(args.checkpoint, args.out)
    print(f"{args.checkpoint} -> {args.out} (budgets frozen at this step: {', '.join(budgets) or 'none'})")
    return 0


def _add_export_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-checkpoint", help="a mid-run training checkpoint as a loadable elastic model")
    p.add_argument("checkpoint", help="RUN/checkpoints/step-N (written by any number of processes)")
    p.add_argument("--out", required=True, help="new directory for the elastic model")
    p.set_defaults(func=cmd_export_checkpoint)


def cmd_export_hf(args: argparse.Namespace) -> int:
    import torch

    from .interop.family import SHARD_BYTES, export_family, parse_size
    from .loading import load

    _check_out(args.out)
    shard = SHARD_BYTES if args.max_shard_size is None else parse_size(args.max_shard_size, "--max-shard-size")
    model = load(args.model)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    export_family(model, args.out, max_shard_bytes=shard, dtype=dtype)
    for name, b in model.elastic.items():
        print(f"  budget {name:>6}: {b.params:,} params, {b.active_params or b.params:,} active  {b.arch.describe()}")
    print(f"{args.model} -> {args.out}: one Hugging Face directory, {len(model.elastic)} budgets (trust_remote_code)")
    return 0


def _add_export_hf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export-hf", help="the whole elastic family as ONE Hugging Face directory (trust_remote_code, budget=)"
    )
    p.add_argument("--model", required=True, help="elastic checkpoint directory (frozen budgets)")
    p.add_argument("--out", required=True, help="new directory for the Hugging Face family")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None, help="default: as stored")
    p.add_argument("--max-shard-size", default=None, help="largest weight file, e.g. 5GB (default), 500MB")
    p.set_defaults(func=cmd_export_hf)


# subcommand -> function that adds its parser; each parser sets func=...
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "importance": _add_importance,
    "prune": _add_prune,
    "train": _add_train,
    "export-checkpoint": _add_export_checkpoint,
    "export-hf": _add_export_hf,
    "slice": _add_slice,
    "eval": _add_eval,
    "generate": _add_generate,
    "harness": _add_harness,
    "demo": _add_demo,
    "serve": _add_serve,
    "data": _add_data,
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nestlm")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(  # every subcommand's --help shows the defaults (cli_common.DefaultsFormatter)
        prog="nestlm",
        description=(
            "Train one hybrid Mamba-Attention LM with smaller models nested inside it; slice or serve any of them."
        ),
    )
    parser.add_argument("--version", action="version", version=f"nestlm {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


_python_format_warning = warnings.formatwarning


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """nestlm's own warnings as one line on the terminal (others as Python prints them)."""
    if str(filename).startswith(str(Path(__file__).resolve().parent)):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["harness"]:  # every argument belongs to the harness's own parser
        from .harness import main as harness_main

        return harness_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may come after options: `nestlm train R --out D train.lr=1e-3`
        takes = getattr(args, "command", None) in ("train", "demo")
        if takes and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        check_option_ranges(args)
        return int(args.func(args) or 0)
    except NestlmError as e:
        code = getattr(e, "exit_code", 2)  # 75 (preempted at a checkpoint: run again with --resume)
        if str(e):
            print(f"nestlm: {'error: ' if code == 2 else ''}{e}", file=sys.stderr)
        return code
    except OSError as e:  # a write no writer wrapped (reports, the demo): one line, not a traceback
        from .checkpoint import io_error_line

        print(f"nestlm: error: {io_error_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nestlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
