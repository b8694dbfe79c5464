"""Training data: local text -> one token stream -> packed blocks -> deterministic batches.

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
                            synthetic problems of nestlm.eval.reasoning from the
                            training seeds ``seed * num_problems ...`` (never test seeds)

Text documents are tokenized and each is followed by the tokenizer's EOS; pre-tokenized
records are concatenated as they are (add EOS yourself where you want one). ``max_bytes``
caps the text read (UTF-8 bytes; the last document is cut at the cap).

The token stream is split once, in token space, into a training part and a held-out
validation tail (``val_fraction`` of the tokens, at least one block). Each part is
packed into blocks of ``seq_len + 1`` tokens with stride ``seq_len`` (inputs
``block[:-1]``, targets ``block[1:]``, so every token is a target exactly once).
Because the split does not depend on ``seq_len`` (once the tail holds a block), a
curriculum that changes ``seq_len`` between stages never trains on validation text.

:class:`BlockLoader` draws global batches of ``batch_size`` training blocks in an order
shuffled per epoch from ``seed``; process ``rank`` of ``world`` gets the ``rank``-th
contiguous chunk of every global batch, so any number of processes sees the same global
batches. ``state_dict()`` is the exact position (epoch, blocks drawn in the epoch):
a loader restored from it draws exactly the batches the saved one would have drawn.

Rows (``data.packing: rows``): instead of cutting one stream at fixed strides, whole
documents are packed greedily into rows of ``seq_len + 1`` tokens, every row starting
at a document's start and the rest padded (padding is never a target). A document
longer than a row fills consecutive rows. With ``data.loss: completion`` only the
completion part of a document is a target: for ``reasoning:*`` problems the worked
solution and answer after the question. Why: a small model trained on fixed windows
mostly sees problems cut in the middle, without their question, and learns to continue
plausible steps instead of solving the question it was asked.
"""

from __future__ import annotations

import functools
import json
import math
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import NestlmError
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
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
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
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def _parse_reasoning(spec: str) -> tuple[str, list[int]]:
    """``reasoning:VARIANT[:D]`` or ``reasoning:VARIANT:D1,D2,...`` (problem i has difficulty D[i % n])."""
    from ..eval import reasoning

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
    from ..eval import reasoning

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


# ----------------------------------------------------------------------------- packing
class RowDataset:
    """Whole documents packed greedily into rows of ``seq_len + 1`` tokens, each row starting
    at a document's start; the rest of a row is ``pad_id`` and is never a target.

    ``ds.batch(indices)`` gives (inputs, targets) like :class:`TokenDataset`, with targets
    ``IGNORE`` (-100, what ``cross_entropy`` skips) at padding and context-only tokens.
    """

    IGNORE = -100

    def __init__(self, docs: Sequence[tuple[torch.Tensor, int]], seq_len: int, pad_id: int = 0) -> None:
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise NestlmError(f"seq_len must be a positive int, got {seq_len!r}")
        self.seq_len, width = seq_len, seq_len + 1
        rows: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        cur_ids: list[torch.Tensor] = []
        cur_loss: list[torch.Tensor] = []
        used = 0
        for ids, n_ctx in docs:
            loss = torch.arange(ids.numel()) >= n_ctx  # which tokens are targets
            for s in range(0, ids.numel(), width):  # a document longer than a row fills several
                piece = slice(s, s + width)
                if used and used + ids[piece].numel() > width:  # it does not fit: start a new row
                    rows.append((cur_ids, cur_loss))
                    cur_ids, cur_loss, used = [], [], 0
                cur_ids.append(ids[piece])
                cur_loss.append(loss[piece])
                used += ids[piece].numel()
        if used:
            rows.append((cur_ids, cur_loss))
        self.n = len(rows)
        self.tokens = torch.full((self.n, width), pad_id, dtype=torch.long)
        self.loss = torch.zeros((self.n, width), dtype=torch.bool)
        for r, (parts, losses) in enumerate(rows):
            row_ids, row_loss = torch.cat(parts), torch.cat(losses)
            self.tokens[r, : row_ids.numel()] = row_ids
            self.loss[r, : row_ids.numel()] = row_loss
        self.loss[:, 0] = False  # never a target (nothing before it)

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each a (len(indices), seq_len) LongTensor; targets IGNORE where not trained."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"row indices must be within 0..{self.n - 1}")
        rows, keep = self.tokens[idx], self.loss[idx]
        targets = torch.where(keep[:, 1:], rows[:, 1:], torch.full_like(rows[:, 1:], self.IGNORE))
        return rows[:, :-1].contiguous(), targets.contiguous()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]


class PackedRows:
    """Documents split into training documents and a held-out validation tail (the last
    ``max(ceil(N * val_fraction), 1)`` documents, none when ``val_fraction`` is 0), each part
    packed into rows (:class:`RowDataset`). Same interface as :class:`PackedBlocks`."""

    def __init__(
        self,
        docs: Sequence[tuple[torch.Tensor, int]],
        seq_len: int,
        val_fraction: float = 0.02,
        name: str = "data",
        pad_id: int = 0,
    ) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise NestlmError(f"val_fraction must be within [0, 1), got {val_fraction}")
        n_val = max(math.ceil(len(docs) * val_fraction), 1) if val_fraction > 0 else 0
        if len(docs) - n_val < 1:
            raise NestlmError(
                f"data {name} has {len(docs)} documents: holding out {n_val} for validation leaves none to train on; "
                "give more data or val_fraction=0"
            )
        self.name, self.seq_len, self.val_fraction = name, seq_len, val_fraction
        self.train = RowDataset(docs[: len(docs) - n_val], seq_len, pad_id)
        self.val = RowDataset(docs[len(docs) - n_val :], seq_len, pad_id)


class TokenDataset:
    """A token stream cut into blocks of ``seq_len + 1`` tokens with stride ``seq_len``.

    Block ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``; ``ds[i]`` is its
    (inputs, targets) pair. A stream shorter than one block has no blocks.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise NestlmError(f"seq_len must be a positive int, got {seq_len!r}")
        if tokens.dim() != 1:
            raise NestlmError(f"a token stream is 1-D, got shape {tuple(tokens.shape)}")
        self.tokens, self.seq_len = tokens, seq_len
        self.n = max(0, (tokens.numel() - 1) // seq_len)
        self._span = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return self.n

    def block(self, i: int) -> torch.Tensor:
        """The ``seq_len + 1`` tokens of block ``i`` (a view)."""
        if not 0 <= i < self.n:
            raise IndexError(f"block {i} of {self.n}")
        s = i * self.seq_len
        return self.tokens[s : s + self.seq_len + 1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.block(i).long()
        return b[:-1], b[1:]

    def batch(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each a (len(indices), seq_len) LongTensor."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"block indices must be within 0..{self.n - 1}")
        blocks = self.tokens[idx[:, None] * self.seq_len + self._span].long()
        return blocks[:, :-1].contiguous(), blocks[:, 1:].contiguous()


class PackedBlocks:
    """A token stream split into a training part and a held-out validation tail, both packed.

    The tail is the last ``max(ceil(N * val_fraction), seq_len + 1)`` tokens (none when
    ``val_fraction`` is 0); training blocks come only from the tokens before it, so no
    token of a validation block is ever trained on.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, val_fraction: float = 0.02, name: str = "data") -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise NestlmError(f"val_fraction must be within [0, 1), got {val_fraction}")
        n_tok, block = tokens.numel(), seq_len + 1
        if n_tok < block:
            raise NestlmError(
                f"data {name} has {n_tok} tokens, fewer than one block of seq_len+1={block}; "
                "give more data or a shorter seq_len"
            )
        n_val_tok = max(math.ceil(n_tok * val_fraction), block) if val_fraction > 0 else 0
        cut = n_tok - n_val_tok
        if cut < block:
            raise NestlmError(
                f"data {name} has {n_tok} tokens: holding out {n_val_tok} for validation (val_fraction={val_fraction}) "
                f"leaves {cut}, fewer than one training block of seq_len+1={block}; "
                "give more data, a shorter seq_len or val_fraction=0"
            )
        self.name, self.seq_len, self.val_fraction = name, seq_len, val_fraction
        self.tokens, self.split_at = tokens, cut
        self.train = TokenDataset(tokens[:cut], seq_len)
        self.val = TokenDataset(tokens[cut:], seq_len)


class BlockLoader:
    """Deterministic, resumable, rank-sharded batches of packed blocks.

    ``batch_size`` is the GLOBAL batch; :meth:`next_batch` returns this rank's contiguous
    chunk of it, ``(batch_size // world, seq_len)`` inputs and targets. Training blocks are
    drawn in a permutation of the training blocks per epoch, from ``(seed, epoch)``; a
    global batch may run across an epoch boundary.

    ``tokens`` is a 1-D token stream, or a :class:`PackedBlocks` (or :class:`PackedRows`)
    to share one split between loaders (its ``seq_len`` must match).
    """

    def __init__(
        self,
        tokens: torch.Tensor | PackedBlocks | PackedRows,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        val_fraction: float = 0.02,
        rank: int = 0,
        world: int = 1,
        name: str = "data",
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise NestlmError(f"batch_size must be a positive int, got {batch_size!r}")
        if world < 1 or not 0 <= rank < world:
            raise NestlmError(f"rank {rank} is not within 0..{world - 1} (world {world})")
        if batch_size % world:
            raise NestlmError(
                f"batch_size {batch_size} must be divisible by the {world} processes "
                f"(it is the global batch; each process takes batch_size/{world})"
            )
        if isinstance(tokens, PackedBlocks | PackedRows):
            if tokens.seq_len != seq_len:
                raise NestlmError(f"PackedBlocks has seq_len {tokens.seq_len}, the loader was given {seq_len}")
            self.blocks = tokens
        else:
            self.blocks = PackedBlocks(tokens, seq_len, val_fraction, name)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world = rank, world
        self.n_train, self.n_val = len(self.blocks.train), len(self.blocks.val)
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------ order
    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the training blocks in ``epoch`` (a pure function of seed and epoch)."""
        if epoch != self._perm_epoch:
            ss = np.random.SeedSequence([self.seed % 2**64, epoch, 0x6E6573])
            self._perm = np.random.Generator(np.random.PCG64(ss)).permutation(self.n_train)
            self._perm_epoch = epoch
        return self._perm

    def next_global_indices(self) -> list[int]:
        """The training block indices of the next GLOBAL batch (advances the position)."""
        out = []
        for _ in range(self.batch_size):
            if self.pos >= self.n_train:
                self.epoch, self.pos = self.epoch + 1, 0
            out.append(int(self.permutation(self.epoch)[self.pos]))
            self.pos += 1
        return out

    def _shard(self, indices: list[int]) -> list[int]:
        per = len(indices) // self.world
        return indices[self.rank * per : (self.rank + 1) * per]

    # ------------------------------------------------------------ batches
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of the next global batch, each (batch_size // world, seq_len)."""
        return self.blocks.train.batch(self._shard(self.next_global_indices()))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to ``n`` validation batches (this rank's chunks of global batches), the same every call.

        There are ``max(1, n_val // batch_size)`` distinct ones at most; when the validation
        split holds fewer blocks than a global batch, its blocks repeat to fill the one batch.
        """
        if self.n_val == 0 or n <= 0:
            return []
        count = min(n, max(1, self.n_val // self.batch_size))
        out = []
        for b in range(count):
            glob = [(b * self.batch_size + j) % self.n_val for j in range(self.batch_size)]
            out.append(self.blocks.val.batch(self._shard(glob)))
        return out

    @property
    def steps_per_epoch(self) -> float:
        return self.n_train / self.batch_size

    # ------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The exact data position, plus what it is only valid for (JSON-serialisable)."""
        return {
            "epoch": self.epoch,
            "pos": self.pos,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_train": self.n_train,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the next batches equal the saved loader's next ones."""
        for key, mine in (("seed", self.seed), ("seq_len", self.seq_len), ("n_train", self.n_train)):
            if key in state and state[key] != mine:
                raise NestlmError(
                    f"the saved data position is for {key}={state[key]}, this loader has {key}={mine}: "
                    "the data, seed or seq_len changed since the checkpoint, so the run cannot resume exactly"
                )
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos <= self.n_train:
            raise NestlmError(f"the saved data position (epoch {epoch}, pos {pos}) is outside {self.n_train} blocks")
        self.epoch, self.pos = epoch, pos
