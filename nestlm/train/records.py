"""Reading data files record by record: .jsonl, .parquet and ``datasets.save_to_disk`` directories.

A record holds one of (the first record of a file fixes which; every record must have it):
  ``text``                      a document (str)
  ``input_ids``                 a pre-tokenized document, used as is
  ``messages``                  a conversation: [{"role": system|user|assistant|tool, "content": ...}, ...]
                                (``reasoning_content``, ``tool_calls``... kept for the template)
  ``prompt`` + ``completion``   TRL's prompt/completion format: two strings, or two lists of messages

Conversations and prompt/completion pairs become :class:`Record` s, rendered and masked by
train/chat.py. Every file is read as a stream (one line, or one Parquet batch, at a time), so
memory does not grow with the file. A bad record is one line naming the file and the line (row).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import NestlmError

FIELDS = ("input_ids", "messages", "prompt_completion", "text")  # in the order a record is recognised
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # what datasets.save_to_disk writes (one split)


@dataclass
class Record:
    """A conversation (``messages``) or a prompt/completion pair, and where it was read (file and line)."""

    kind: str  # "messages" or "prompt_completion"
    data: dict[str, Any]
    where: str  # e.g. "data/chat.jsonl line 12"


Document = str | torch.Tensor | Record  # text, the token ids of a pre-tokenized record, or a record to render


def field_of(rec: dict[str, Any]) -> str | None:
    """Which kind of record ``rec`` is (one of FIELDS), None when it holds none of them."""
    for f in FIELDS:
        if f in rec or (f == "prompt_completion" and "prompt" in rec and "completion" in rec):
            return f
    return None


WANTED = "'text', 'messages', 'prompt' and 'completion' (TRL), or 'input_ids'"


def json_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
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


def check_ids(ids: Any, where: str) -> torch.Tensor:
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise NestlmError(f"{where}: 'input_ids' must be a list of integer token ids")
    t = torch.tensor(ids, dtype=torch.long)
    if t.numel() and int(t.min()) < 0:
        raise NestlmError(f"{where}: 'input_ids' holds a negative token id ({int(t.min())})")
    return t


def _document(field: str, rec: dict[str, Any], where: str, table: bool = False) -> Document | None:
    """The document of one record (None: a table's null text, nothing in it)."""
    if field == "text":
        if rec["text"] is None and table:
            return None
        if not isinstance(rec["text"], str):
            raise NestlmError(f"{where}: 'text' is a {type(rec['text']).__name__}, not a string")
        return rec["text"]
    if field == "input_ids":
        return check_ids(list(rec["input_ids"]) if rec["input_ids"] is not None else None, where)
    if field == "messages":
        return Record("messages", {"messages": rec["messages"], "tools": rec.get("tools")}, where)
    return Record("prompt_completion", {k: rec.get(k) for k in ("prompt", "completion", "tools")}, where)


def read_jsonl(path: Path) -> Iterator[Document]:
    field = None  # fixed by the first record
    first = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise NestlmError(f"{path} line {i} is not valid UTF-8 (byte {e.start}); re-encode the file") from None
            if not line.strip():
                continue
            rec = json_record(path, i, line)
            if field is None:
                field, first = field_of(rec) or "text", i
            if field_of(rec) != field:
                keys = ", ".join(map(repr, rec)) or "none"
                mixed = f" (line {first} has {field!r}; every line of a file holds the same field)" if i > first else ""
                raise NestlmError(
                    f"{path} line {i} has no {field!r} field (its keys: {keys}){mixed}; each line needs {WANTED}"
                )
            doc = _document(field, rec, f"{path} line {i}")
            if doc is not None:
                yield doc


def _rows(path: Path, names: list[str], batches: Iterator[Any], what: str = "row") -> Iterator[Document]:
    """The documents of a table given as record batches (pyarrow), rows numbered from 1."""
    field = field_of(dict.fromkeys(names))
    if field is None:
        raise NestlmError(
            f"{path} has no 'text' (or 'input_ids') column (its columns: {', '.join(names) or 'none'}); give {WANTED}"
        )
    row = 0
    for batch in batches:
        for rec in batch.to_pylist():
            row += 1
            doc = _document(field, rec, f"{path} {what} {row}", table=True)
            if doc is not None:
                yield doc


def read_parquet(path: Path) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NestlmError(
            f"{path} is a .parquet file, which needs pyarrow: pip install nestlm[parquet] "
            "(or convert it to .jsonl with a 'text' field)"
        ) from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    field = field_of(dict.fromkeys(names))
    cols = None if field is None else ["prompt", "completion"] if field == "prompt_completion" else [field]
    if cols is not None and field in ("messages", "prompt_completion") and "tools" in names:
        cols.append("tools")
    yield from _rows(path, names, pf.iter_batches(batch_size=256, columns=cols))


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``datasets``' save_to_disk (a Dataset, or a DatasetDict of splits)."""
    return path.is_dir() and (
        all((path / f).is_file() for f in SAVED_DATASET_FILES) or (path / "dataset_dict.json").is_file()
    )


def read_saved_dataset(path: Path) -> Iterator[Document]:
    """The rows of a ``save_to_disk`` directory (its 'train' split for a DatasetDict), memory-mapped."""
    try:
        import datasets
    except ImportError:
        raise NestlmError(
            f"{path} is a saved Hugging Face dataset, which needs: pip install nestlm[datasets]"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many kinds for a damaged directory
        raise NestlmError(f"{path}: datasets cannot load it ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise NestlmError(f"{path} holds the splits {', '.join(ds)}, no 'train'; give one split's directory")
        ds = ds["train"]
    yield from _rows(path, list(ds.column_names), ds.data.to_batches(max_chunksize=256))


def read_file(path: Path) -> Iterator[Document]:
    """The documents of one file; an unreadable file or a line that is not UTF-8 is one line naming it."""
    try:
        if path.suffix == ".jsonl":
            yield from read_jsonl(path)
        elif path.suffix == ".parquet":
            yield from read_parquet(path)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")
    except UnicodeDecodeError as e:
        raise NestlmError(f"{path} is not valid UTF-8 (byte {e.start} of a line); re-encode it as UTF-8") from None
    except OSError as e:
        raise NestlmError(f"data file {path} cannot be read: {e.strerror or e}") from None
