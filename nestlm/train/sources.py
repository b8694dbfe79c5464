"""Training data sources: local text (or synthetic problems) -> documents -> token ids.

The loader (packing into blocks or rows, batches) is in train/loader.py.

Sources (``spec``), all local, nothing downloaded:
  FILE.txt / .md / .py / .rst / any file   the file's text, one document
  DIR                       every *.txt *.md *.py *.rst *.jsonl *.parquet under it,
                            recursively, in sorted path order (hidden paths skipped)
  FILE.jsonl                one JSON object per line: ``{"text": ...}`` (a document)
                            or ``{"input_ids": [...]}`` (pre-tokenized, used as is)
  FILE.parquet              column ``text`` (or ``input_ids``); needs pyarrow
  stdlib                    the Python standard library's own .py sources (tests and
                            site-packages left out), sorted, the same on every run
  reasoning[:short|long[:DIFFICULTY]]
                            synthetic problems of nestlm.tasks.reasoning from the
                            training seeds ``seed * num_problems ...`` (never test seeds)

Text documents are tokenized and each is followed by the tokenizer's EOS; pre-tokenized
records are concatenated as they are (add EOS yourself where you want one). ``max_bytes``
caps the text read (UTF-8 bytes; the last document is cut at the cap).
"""

from __future__ import annotations

import functools
import json
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NestlmError
from ..tasks import reasoning
from ..tokenizer import ByteTokenizer

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
DIR_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
SPECIAL_SOURCES = "'stdlib' or 'reasoning:short|long'"
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_KINDS = "a text file, a directory, .jsonl (text or input_ids), .parquet, " + SPECIAL_SOURCES

Document = str | torch.Tensor  # text, or the token ids of a pre-tokenized record


# ----------------------------------------------------------------------------- reading
def is_pretokenized(spec: str | Path) -> bool:
    """Whether ``spec`` is a .jsonl file whose first record holds ``input_ids``."""
    p = Path(spec)
    if p.suffix != ".jsonl" or not p.is_file():
        return False
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                rec = _json_record(p, i, line)
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


def _json_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise NestlmError(
            f'{path} line {lineno} is not valid JSON ({e.msg}); each line must be one object such as {{"text": "..."}}'
        ) from None
    if not isinstance(rec, dict):
        raise NestlmError(
            f"{path} line {lineno} is a JSON {type(rec).__name__}, not an object; "
            'each line must be {"text": "..."} or {"input_ids": [...]}'
        )
    return rec


def _check_ids(ids: Any, where: str) -> torch.Tensor:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise NestlmError(f"{where}: 'input_ids' must be a list of integer token ids")
    t = torch.tensor(ids, dtype=torch.long)
    if t.numel() and int(t.min()) < 0:
        raise NestlmError(f"{where}: 'input_ids' holds a negative token id ({int(t.min())})")
    return t


def _read_jsonl(path: Path) -> Iterator[Document]:
    field = None  # "text" or "input_ids", fixed by the first record
    first = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NestlmError(f"{path} line {i} is not valid UTF-8 (byte {e.start}); re-encode the file") from None
            if not line.strip():
                continue
            rec = _json_record(path, i, line)
            if field is None:
                field, first = ("input_ids" if "input_ids" in rec else "text"), i
            if field not in rec:
                keys = ", ".join(map(repr, rec)) or "none"
                mixed = (
                    f" (line {first} has {field!r}; a file is either all text or all input_ids)" if i > first else ""
                )
                raise NestlmError(
                    f"{path} line {i} has no {field!r} field (its keys: {keys}){mixed}; "
                    'each line needs {"text": "..."} or {"input_ids": [...]}'
                )
            if field == "text":
                if not isinstance(rec["text"], str):
                    raise NestlmError(f"{path} line {i}: 'text' is a {type(rec['text']).__name__}, not a string")
                yield rec["text"]
            else:
                yield _check_ids(rec["input_ids"], f"{path} line {i}")


def _read_parquet(path: Path) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NestlmError(
            f"{path} is a .parquet file, which needs pyarrow: pip install nestlm[parquet] "
            "(or convert it to .jsonl with a 'text' field)"
        ) from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    column = "text" if "text" in names else "input_ids" if "input_ids" in names else None
    if column is None:
        raise NestlmError(
            f"{path} has no 'text' (or 'input_ids') column (its columns: {', '.join(names) or 'none'}); "
            "rename the text column to 'text'"
        )
    for batch in pf.iter_batches(columns=[column]):
        for row, value in enumerate(batch.column(0).to_pylist()):
            if value is None:
                continue
            if column == "text":
                yield str(value)
            else:
                yield _check_ids(list(value), f"{path} ({column} row {row})")


def _read_file(path: Path) -> Iterator[Document]:
    """The documents of one file; an unreadable file or a line that is not UTF-8 is one line naming it."""
    try:
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
    except UnicodeDecodeError as e:
        raise NestlmError(f"{path} is not valid UTF-8 (byte {e.start} of a line); re-encode it as UTF-8") from None
    except OSError as e:
        raise NestlmError(f"data file {path} cannot be read: {e.strerror or e}") from None


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
    for f in _dir_files(p) if p.is_dir() else [p]:
        yield from _read_file(f)


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


def _stream(docs: Iterable[Document], tokenizer: Any, chunk: int = 256) -> torch.Tensor:
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
) -> torch.Tensor:
    """The whole token stream of ``spec`` as a 1-D LongTensor.

    Text is tokenized with ``tokenizer`` (``encode(text) -> list[int]``, ``eos_token_id``),
    one EOS after each document; pre-tokenized input_ids need no tokenizer. With
    ``vocab_size`` (default: the tokenizer's, if it has one) every id is checked to be below it.
    """
    docs = _capped(_documents(spec, num_problems, seed), max_bytes)
    tokens = _stream(docs, tokenizer)
    if tokens.numel() == 0:
        raise NestlmError(f"data {spec} holds no text (every document is empty); give data with text in it")
    vocab = vocab_size if vocab_size is not None else getattr(tokenizer, "vocab_size", None)
    if vocab is not None and int(tokens.max()) >= vocab:
        raise NestlmError(
            f"data {spec} has token id {int(tokens.max())}, outside the vocabulary of {vocab}; "
            "the data was tokenized for another model"
        )
    return tokens


def load_documents(
    spec: str | Path,
    tokenizer: Any = None,
    max_bytes: int | None = None,
    num_problems: int = 20000,
    seed: int = 0,
    completion_only: bool = False,
) -> list[tuple[torch.Tensor, int]]:
    """Each document of ``spec`` as ``(ids, n_context)``: its token ids (EOS appended, as in
    :func:`load_tokens`) and how many leading tokens are context only, never targets.

    ``n_context`` is 0 unless ``completion_only``; then, for ``reasoning:*`` problems, it is
    the length of the question (the targets are the worked solution, the answer and EOS).
    """
    s = str(spec)
    is_reasoning = s == "reasoning" or s.startswith("reasoning:")
    if completion_only and not is_reasoning:
        raise NestlmError(
            f"data.loss: completion needs documents with a prompt and a completion; {s} has none "
            "(use reasoning:* data, or data.loss: all)"
        )
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    tail = [eos] if eos is not None else []
    if is_reasoning:
        if tokenizer is None:
            raise NestlmError("this data is text and needs a tokenizer (or give pre-tokenized .jsonl input_ids)")
        out = []
        for p in _reasoning_problems(s, num_problems, seed):
            q, a = _encode_all([p.prompt, p.cot], tokenizer)
            out.append((torch.cat([q, a, torch.tensor(tail, dtype=torch.long)]), q.numel() if completion_only else 0))
        return out
    out = []
    for d in _capped(_documents(spec, num_problems, seed), max_bytes):
        if len(d) == 0:
            continue
        if isinstance(d, str):
            if tokenizer is None:
                raise NestlmError("this data is text and needs a tokenizer (or give pre-tokenized .jsonl input_ids)")
            ids = torch.cat([_encode_all([d], tokenizer)[0], torch.tensor(tail, dtype=torch.long)])
        else:
            ids = d.long()
        out.append((ids, 0))
    if not out:
        raise NestlmError(f"data {spec} holds no text (every document is empty); give data with text in it")
    return out
