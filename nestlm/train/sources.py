"""Training data sources: local text (or synthetic problems) -> documents -> token ids.

The loader (packing into blocks or rows, batches) is in train/loader.py.

Sources (``spec``), all local, nothing downloaded:
  FILE.txt / .md / .py / .rst / any file   the file's text, one document
  DIR                       every *.txt *.md *.py *.rst *.jsonl *.parquet under it,
                            recursively, in sorted path order (hidden paths skipped)
  FILE.jsonl                one JSON object per line: ``{"text": ...}`` (a document),
                            ``{"input_ids": [...]}`` (pre-tokenized, used as is),
                            ``{"messages": [...]}`` (a conversation) or ``{"prompt", "completion"}``
                            (TRL); see train/records.py, and train/chat.py for the chat template
  FILE.parquet              the same as columns; needs pyarrow
  DIR of datasets           a directory written by ``datasets``' save_to_disk (pip install nestlm[datasets])
  stdlib                    the Python standard library's own .py sources (tests and
                            site-packages left out), sorted, the same on every run
  reasoning[:short|long[:DIFFICULTY]]
                            synthetic problems of nestlm.tasks.reasoning from the
                            training seeds ``seed * num_problems ...`` (never test seeds)

Text documents are tokenized and each is followed by the tokenizer's EOS; pre-tokenized
records are concatenated as they are (add EOS yourself where you want one); conversations
end with the template's own end-of-turn tokens. ``max_bytes`` caps the text read (UTF-8
bytes; the last document is cut at the cap).
"""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NestlmError
from ..tasks import reasoning
from ..tokenizer import ByteTokenizer
from .chat import LOSSES, ChatFormat, trained_mask
from .records import Document, Record, is_saved_dataset, json_record, read_file, read_saved_dataset

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
DIR_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
SPECIAL_SOURCES = "'stdlib' or 'reasoning:short|long'"
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_KINDS = "a text file, a directory, .jsonl or .parquet (text, messages, prompt/completion, input_ids), "
_KINDS += "a datasets.save_to_disk directory, " + SPECIAL_SOURCES


# ----------------------------------------------------------------------------- reading
def is_pretokenized(spec: str | Path) -> bool:
    """Whether ``spec`` is a .jsonl file whose first record holds ``input_ids``."""
    p = Path(spec)
    if p.suffix != ".jsonl" or not p.is_file():
        return False
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rec = json_record(p, i, line)
                return "input_ids" in rec
    return False


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), sorted by relative path."""
    return list(_stdlib_files())


@functools.lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise NestlmError(f"the Python standard library was not found at {root}; give a text file or directory")
    files = [p for p in root.rglob("*.py") if not (_STDLIB_SKIP & set(p.relative_to(root).parts[:-1])) and p.is_file()]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _dir_files(d: Path) -> list[Path]:
    files = []
    for p in d.rglob("*"):
        rel = p.relative_to(d).parts
        if p.suffix in DIR_SUFFIXES and p.is_file() and not any(part.startswith(".") for part in rel):
            files.append(p)
    if not files:
        raise NestlmError(
            f"directory {d} has no data files ({', '.join('*' + s for s in DIR_SUFFIXES)}); "
            "give a directory that holds some, or a single file"
        )
    return sorted(files, key=lambda p: p.relative_to(d).as_posix())


def is_reasoning(spec: str | Path) -> bool:
    """A ``reasoning[:...]`` source (synthetic problems, generated on demand)."""
    return str(spec) == "reasoning" or str(spec).startswith("reasoning:")


def _parse_reasoning(spec: str) -> tuple[str, list[int]]:
    """``reasoning:VARIANT[:D]`` or ``reasoning:VARIANT:D1,D2,...`` (problem i has difficulty D[i % n])."""

    parts = spec.split(":")
    variant = parts[1] if len(parts) > 1 else "short"
    try:
        difficulties = [int(d) for d in parts[2].split(",")] if len(parts) > 2 else [1]
    except ValueError:
        difficulties = [0]  # reported below
    if (
        len(parts) > 3
        or variant not in reasoning.VARIANTS
        or any(d not in reasoning.DIFFICULTIES for d in difficulties)
    ):
        raise NestlmError(
            f"data {spec!r}: write reasoning:VARIANT[:DIFFICULTY] with VARIANT one of "
            f"{', '.join(reasoning.VARIANTS)} and DIFFICULTY within 1..{reasoning.DIFFICULTIES.stop - 1} "
            "(or a comma-separated list of them, cycled through)"
        )
    return variant, difficulties


def _reasoning_problems(spec: str, num_problems: int, seed: int) -> list[Any]:
    """The training problems of a ``reasoning:*`` source (training seeds only)."""

    variant, diffs = _parse_reasoning(spec)
    start = seed * num_problems
    by_d = {d: reasoning.train_problems(num_problems, variant, d, start=start) for d in set(diffs)}
    return [by_d[diffs[i % len(diffs)]][i] for i in range(num_problems)]


def _documents(spec: str | Path, num_problems: int, seed: int) -> Iterator[Document]:
    s = str(spec)
    if s == "stdlib":
        for p in stdlib_files():
            yield p.read_text(encoding="utf-8", errors="replace")
        return
    if s == "reasoning" or s.startswith("reasoning:"):
        for p in _reasoning_problems(s, num_problems, seed):
            yield p.text
        return
    p = Path(spec)
    if not p.exists():
        raise NestlmError(f"data {s} does not exist; give {_KINDS}")
    if is_saved_dataset(p):
        yield from read_saved_dataset(p)
        return
    for f in _dir_files(p) if p.is_dir() else [p]:
        yield from read_file(f)


def _capped(docs: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
    """Text documents up to ``max_bytes`` UTF-8 bytes in all (the last one cut)."""
    if max_bytes is not None and max_bytes <= 0:
        raise NestlmError(f"max_bytes must be positive, got {max_bytes}")
    total = 0
    for d in docs:
        if max_bytes is not None and isinstance(d, str):
            b = d.encode("utf-8")
            if total + len(b) >= max_bytes:
                yield b[: max_bytes - total].decode("utf-8", errors="ignore")
                return
            total += len(b)
        yield d


def read_texts(spec: str | Path, max_bytes: int | None = None, num_problems: int = 20000, seed: int = 0) -> list[str]:
    """The text documents of ``spec`` (see the module doc), in a fixed order.

    ``num_problems`` and ``seed`` choose the training seeds of ``reasoning:*`` sources
    (problems ``seed * num_problems ... (seed + 1) * num_problems - 1``).
    """
    out: list[str] = []
    for d in _capped(_documents(spec, num_problems, seed), max_bytes):
        if isinstance(d, Record):
            raise NestlmError(f"{d.where} is a conversation or prompt/completion record, not plain text")
        if not isinstance(d, str):
            raise NestlmError(f"data {spec} holds pre-tokenized input_ids, not text; load it with load_tokens")
        out.append(d)
    if not any(out):
        raise NestlmError(f"data {spec} holds no text ({len(out)} documents, all empty); give data with text in it")
    return out


def _encode_all(texts: Sequence[str], tokenizer: Any) -> list[torch.Tensor]:
    if isinstance(tokenizer, ByteTokenizer):  # fast path: bytes + 3, no Python list per byte
        return [torch.from_numpy(np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 3) for t in texts]
    if hasattr(tokenizer, "encode_batch"):
        return [torch.tensor(ids, dtype=torch.long) for ids in tokenizer.encode_batch(list(texts))]
    return [torch.tensor(tokenizer.encode(t), dtype=torch.long) for t in texts]


def tokenize(texts: Iterable[str], tokenizer: Any, chunk: int = 256) -> torch.Tensor:
    """One LongTensor stream: each document's tokens followed by ``tokenizer.eos_token_id``
    (when the tokenizer has one)."""
    return _stream(texts, tokenizer, chunk)


def _record(d: Record, chat: ChatFormat | None, loss: str) -> tuple[torch.Tensor, list]:
    if chat is None:
        raise NestlmError(
            f"{d.where} is a {'conversation' if d.kind == 'messages' else 'prompt/completion record'}, which needs "
            "the tokenizer's chat template: give a model directory's tokenizer (or 'bytes' and data.chat_template)"
        )
    return chat.encode(d, loss)


def _stream(docs: Iterable[Document], tokenizer: Any, chunk: int = 256, chat: ChatFormat | None = None) -> torch.Tensor:
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    eos_t = torch.tensor([eos], dtype=torch.long) if eos is not None else None
    parts: list[torch.Tensor] = []
    pending: list[str] = []

    def flush() -> None:
        for t in _encode_all(pending, tokenizer):
            parts.append(t)
            if eos_t is not None:
                parts.append(eos_t)
        pending.clear()

    for d in docs:
        if isinstance(d, Record):  # rendered by the chat template, which ends it (no EOS added)
            flush()
            parts.append(_record(d, chat, "all")[0])
            continue
        if len(d) == 0:  # an empty document adds nothing, not even an EOS
            continue
        if isinstance(d, str):
            if tokenizer is None:
                raise NestlmError("this data is text and needs a tokenizer (or give pre-tokenized .jsonl input_ids)")
            pending.append(d)
            if len(pending) >= chunk:
                flush()
        else:
            flush()
            parts.append(d)
    flush()
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def load_tokens(
    spec: str | Path,
    tokenizer: Any = None,
    max_bytes: int | None = None,
    num_problems: int = 20000,
    seed: int = 0,
    vocab_size: int | None = None,
    chat: ChatFormat | None = None,
) -> torch.Tensor:
    """The whole token stream of ``spec`` as a 1-D LongTensor.

    Text is tokenized with ``tokenizer`` (``encode(text) -> list[int]``, ``eos_token_id``),
    one EOS after each document; pre-tokenized input_ids need no tokenizer; conversations and
    prompt/completion records are rendered by ``chat``. With ``vocab_size`` (default: the
    tokenizer's, if it has one) every id is checked to be below it.
    """
    docs = _capped(_documents(spec, num_problems, seed), max_bytes)
    tokens = _stream(docs, tokenizer, chat=chat)
    if tokens.numel() == 0:
        raise NestlmError(f"data {spec} holds no text (every document is empty); give data with text in it")
    vocab = vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise NestlmError(
            f"data {spec} has token id {int(tokens.max())}, outside the vocabulary of {vocab}; "
            "the data was tokenized for another model"
        )
    return tokens


def iter_documents(
    spec: str | Path,
    tokenizer: Any = None,
    max_bytes: int | None = None,
    num_problems: int = 20000,
    seed: int = 0,
    loss: str = "completion",
    chat: ChatFormat | None = None,
) -> Iterator[tuple[torch.Tensor, int, list | None, str]]:
    """Each document of ``spec``, one at a time, as ``(ids, n_context, spans, where)``.

    ids: its token ids (EOS appended to text, as in :func:`load_tokens`); n_context: for
    ``reasoning:*`` problems the length of the question, else 0; spans: for conversations and
    prompt/completion records the trained spans that ``loss`` asks for (train/chat.py), else None;
    where: the file and line it came from (records), else the source.
    """
    s = str(spec)
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    tail = torch.tensor([eos] if eos is not None else [], dtype=torch.long)
    if s == "reasoning" or s.startswith("reasoning:"):
        if tokenizer is None:
            raise NestlmError("this data is text and needs a tokenizer (or give pre-tokenized .jsonl input_ids)")
        for p in _reasoning_problems(s, num_problems, seed):
            q, a = _encode_all([p.prompt, p.cot], tokenizer)
            yield torch.cat([q, a, tail]), q.numel(), None, s
        return
    for d in _capped(_documents(spec, num_problems, seed), max_bytes):
        if isinstance(d, Record):
            ids, spans = _record(d, chat, loss)
            yield ids, 0, (spans if loss != "all" else None), d.where
        elif len(d) == 0:
            continue
        elif isinstance(d, str):
            if tokenizer is None:
                raise NestlmError("this data is text and needs a tokenizer (or give pre-tokenized .jsonl input_ids)")
            yield torch.cat([_encode_all([d], tokenizer)[0], tail]), 0, None, s
        else:
            yield d.long(), 0, None, s


def load_documents(
    spec: str | Path,
    tokenizer: Any = None,
    max_bytes: int | None = None,
    num_problems: int = 20000,
    seed: int = 0,
    completion_only: bool = False,
    loss: str | None = None,
    chat: ChatFormat | None = None,
) -> list[tuple[torch.Tensor, Any] | tuple[torch.Tensor, Any, str]]:
    """Each document of ``spec`` as ``(ids, n_context)``, or ``(ids, trained, where)`` for a record.

    ``loss`` (``data.loss``; ``completion_only`` is the old ``loss="completion"``): with "all",
    n_context is 0 and every token is a target. Else ``reasoning:*`` problems train on what
    follows the question (n_context = its length), conversations and prompt/completion records
    on ``trained`` (a bool per token: the assistant turns, or the completion), and plain text is
    refused (it has no prompt). A record is never split across rows (``where`` names it).
    """
    loss = loss or ("completion" if completion_only else "all")
    if loss not in LOSSES:
        raise NestlmError(f"data.loss {loss!r} must be one of {', '.join(LOSSES)}")
    out: list[Any] = []
    for ids, n_ctx, spans, where in iter_documents(spec, tokenizer, max_bytes, num_problems, seed, loss, chat):
        if loss == "all":
            out.append((ids, 0))
        elif spans is not None:
            out.append((ids, trained_mask(ids.numel(), spans, loss), where))
        elif n_ctx:
            out.append((ids, n_ctx))
        else:
            raise NestlmError(
                f"data.loss: {loss} needs documents with a prompt and a completion; {where} has none "
                "(use conversations, prompt/completion records or reasoning:* data, or data.loss: all)"
            )
    if not out:
        raise NestlmError(f"data {spec} holds no text (every document is empty); give data with text in it")
    return out
