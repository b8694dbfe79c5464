"""What the ``nestlm`` subcommands share: help texts, the tokenizer of a model directory, output checks."""

from __future__ import annotations

import argparse
import re
from typing import Any

from .checkpoint import require_new_dir
from .errors import NestlmError

COMPILE_HELP = "torch.compile every block first (slower start, faster tokens; needs a C++ compiler on CPU)"
NO_PROGRESS_HELP = "no progress bars (they are drawn only when stderr is a terminal anyway)"
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


def _tokens_for(model_dir: str, data: str, max_bytes: int | None = None, vocab_size: int | None = None) -> Any:
    """Token stream of DATA for the model in model_dir (pre-tokenized input_ids and prepared directories need no
    tokenizer; a prepared directory's first ``max_bytes`` tokens, checked against ``vocab_size``)."""
    from pathlib import Path

    from .train import sources as data_mod
    from .train.shards import Prepared, is_prepared

    if is_prepared(data):  # `nestlm data prepare`'s directory, as train takes it: its tokens, for this vocabulary
        import torch

        prepared = Prepared(data)
        prepared.check_vocab(vocab_size)
        return torch.from_numpy(prepared.mm[: max_bytes or None].astype("int64"))
    if data != "stdlib" and not data.startswith("reasoning") and not Path(data).exists():
        raise NestlmError(f"data {data} does not exist; give a text file, a directory, .jsonl, .parquet or stdlib")
    needs_tok = not data_mod.is_pretokenized(data)
    tok = load_tokenizer(model_dir, required=needs_tok) if needs_tok else None
    return data_mod.load_tokens(data, tok, max_bytes=max_bytes)


def _check_out(out: str) -> None:
    require_new_dir(out, "--out")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each option's default: ``(default: X)`` appended unless the help already says it.

    Nothing is appended for a default of None (the help says what then happens), for flags (False),
    or for an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "%(default)" in text:
            return text
        if re.search(r"default[:=]?\s+" + re.escape(str(d)) + r"(?!\w)", text):  # "(default 64)" already written
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose help shows defaults; its subcommands' parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


# The range of every numeric option of every command (by argparse dest), checked in cli.main before any
# work: one line naming the option, the value and the range, never a traceback from deep inside.
_AT_LEAST_1 = ("an integer >= 1", lambda v: v >= 1)
OPTION_RANGES: dict[str, tuple[str, Any]] = {
    "seq_len": ("an integer >= 2", lambda v: v >= 2),
    "batch_size": _AT_LEAST_1,
    "num_samples": _AT_LEAST_1,
    "depth_batches": _AT_LEAST_1,
    "max_bytes": _AT_LEAST_1,
    "num_problems": _AT_LEAST_1,
    "num_reasoning": _AT_LEAST_1,
    "rows": _AT_LEAST_1,
    "width_multiple": _AT_LEAST_1,
    "world_size": _AT_LEAST_1,
    "num_fewshot": ("an integer >= 0", lambda v: v >= 0),
    "seed": ("an integer in [0, 2**64)", lambda v: 0 <= v < 2**64),
    "tolerance": ("a fraction in [0, 1)", lambda v: 0 <= v < 1),
}


def check_option_ranges(args: argparse.Namespace) -> None:
    """Raise one NestlmError line for the first numeric option outside its range (commands may check more)."""
    for dest, (valid, ok) in OPTION_RANGES.items():
        v = getattr(args, dest, None)
        if isinstance(v, int | float) and not isinstance(v, bool) and not ok(v):
            raise NestlmError(f"--{dest.replace('_', '-')} {v} is out of range: give {valid}")
