"""Pre-tokenized data: ``nestlm data prepare`` tokenizes once into a memory-mapped token shard.

A prepared directory (written atomically: it appears only when complete)::

    shards.json        format, dtype, vocab_size, token and document counts, sources, tokenizer
    tokens-00000.bin   every document's token ids back to back (EOS after each), uint16 when the
                       vocabulary has < 65536 ids, else uint32 (as nanoGPT and Megatron store them)
    docs.npy           int64 (documents + 1,): where each document starts in the tokens, then the end
    context.npy        int64 (documents,): how many leading tokens of each document are prompt only
                       (reasoning:* questions; 0 elsewhere), so ``data.loss: completion`` works
    spans.npy          int64 (spans, 3), only when some document has them: the trained spans of
                       conversations and prompt/completion records (train/chat.py) as [start, end)
                       in the token stream and 1 for a record's last assistant turn (data.loss: last_turn)

Preparing streams: each source is read, rendered and tokenized one record at a time and every
array is written as it grows, so peak memory does not depend on the size of the corpus.
Training opens the shard with ``np.memmap`` and never loads it: :class:`MemmapTokens` is the
1-D token stream the loader cuts into blocks, reading only the blocks a rank draws.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import atomic_dir
from ..errors import NestlmError
from . import sources
from .chat import trained_mask

META = "shards.json"
FORMAT = "nestlm-token-shards"
SHARD = "tokens-00000.bin"


def is_prepared(spec: Any) -> bool:
    """Whether ``spec`` names a directory written by ``nestlm data prepare``."""
    return isinstance(spec, str | Path) and (Path(spec) / META).is_file()


class _Column:
    """An int64 .npy array of rows of ``width`` written as it grows: appends go to a raw file in
    blocks, and ``save()`` copies it into the .npy block by block (memory stays one block)."""

    BLOCK = 1 << 16

    def __init__(self, path: Path, width: int = 1) -> None:
        self.path, self.width, self.n = path, width, 0
        self.raw = open(path.with_suffix(".raw"), "wb")
        self.buf: list[int] = []

    def add(self, *values: int) -> None:
        self.buf.extend(values)
        self.n += 1
        if len(self.buf) >= self.BLOCK:
            self.raw.write(np.asarray(self.buf, dtype=np.int64).tobytes())
            self.buf.clear()

    def save(self) -> None:
        self.raw.write(np.asarray(self.buf, dtype=np.int64).tobytes())
        self.raw.close()
        raw = Path(self.raw.name)
        shape = (self.n,) if self.width == 1 else (self.n, self.width)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int64)), "fortran_order": False, "shape": shape}
        with open(self.path, "wb") as out, open(raw, "rb") as src:  # file to file: no map stays resident
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(src, out, 1 << 20)
        raw.unlink()


def prepare(
    inputs: Sequence[str],
    out: str | Path,
    tokenizer: Any,
    tokenizer_name: str,
    max_bytes: int | None = None,
    num_problems: int = 20000,
    seed: int = 0,
    loss: str = "completion",
    chat: Any = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` (any data.train source) into one prepared directory ``out``; returns its meta.

    ``loss`` chooses the spans kept of conversations and prompt/completion records (``chat``
    renders them): "completion" every assistant turn (training may still ask for the last only),
    "last_turn" the last one, "all" none (every token trains).
    """
    vocab = int(getattr(tokenizer, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise NestlmError("the tokenizer has no vocab_size; give --tokenizer bytes or a model directory")
    dtype = np.uint16 if vocab < 2**16 else np.uint32
    n_tok, n_docs, prompts = 0, 0, False
    with atomic_dir(out) as tmp:
        offsets, context, spans = _Column(tmp / "docs.npy"), _Column(tmp / "context.npy"), _Column(tmp / "spans.npy", 3)
        offsets.add(0)
        with open(tmp / SHARD, "wb") as f:
            for spec in inputs:
                for ids, n_ctx, sp, where in sources.iter_documents(
                    spec, tokenizer, max_bytes, num_problems, seed, loss, chat
                ):
                    if ids.numel() and int(ids.max()) >= vocab:
                        raise NestlmError(f"{where} has token id {int(ids.max())}, outside the vocabulary of {vocab}")
                    f.write(ids.numpy().astype(dtype).tobytes())
                    for s, e, last in sp or []:
                        spans.add(n_tok + s, n_tok + e, int(last))
                    n_tok += ids.numel()
                    n_docs += 1
                    offsets.add(n_tok)
                    context.add(n_ctx)
                    prompts = prompts or n_ctx > 0 or bool(sp)
        if n_tok == 0:
            raise NestlmError(f"{', '.join(map(str, inputs))} hold no tokens; nothing to prepare")
        for col in (offsets, context, spans):
            col.save()
        if spans.n == 0:
            (tmp / "spans.npy").unlink()
        meta = {
            "format": FORMAT,
            "version": 1,
            "dtype": np.dtype(dtype).name,
            "vocab_size": vocab,
            "tokens": n_tok,
            "documents": n_docs,
            "shards": [SHARD],
            "sources": [str(s) for s in inputs],
            "tokenizer": tokenizer_name,
            "has_prompts": prompts,
        }
        if spans.n:
            meta |= {"spans": spans.n, "loss": loss}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def write_raw(out: str | Path, tokens: np.ndarray | Iterable[np.ndarray], vocab_size: int, doc_len: int) -> None:
    """A prepared directory from token arrays already in memory (benchmarks, tests): documents of ``doc_len``."""
    dtype = np.uint16 if vocab_size < 2**16 else np.uint32
    parts = [tokens] if isinstance(tokens, np.ndarray) else tokens  # arrays, or an iterator of them
    n_tok = 0
    with atomic_dir(out) as tmp:
        with open(tmp / SHARD, "wb") as f:
            for p in parts:
                f.write(p.astype(dtype, copy=False).tobytes())
                n_tok += p.size
        offsets = np.minimum(np.arange(0, n_tok + doc_len, doc_len, dtype=np.int64), n_tok)
        offsets = np.unique(offsets)
        np.save(tmp / "docs.npy", offsets)
        np.save(tmp / "context.npy", np.zeros(offsets.size - 1, dtype=np.int64))
        meta = {"format": FORMAT, "version": 1, "dtype": np.dtype(dtype).name, "vocab_size": vocab_size}
        meta |= {"tokens": n_tok, "documents": offsets.size - 1, "shards": [SHARD], "sources": ["raw"]}
        meta |= {"tokenizer": "raw", "has_prompts": False}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


class MemmapTokens:
    """A 1-D token stream over a memory-mapped shard (or a contiguous part of it), read on demand.

    Enough of a tensor for the loader: ``numel()``, ``dim()``, slicing with a step of 1 (a view),
    and indexing with an index tensor (a LongTensor of the ids there)."""

    def __init__(self, mm: np.memmap, start: int = 0, stop: int | None = None) -> None:
        self.mm, self.start = mm, start
        self.stop = mm.shape[0] if stop is None else stop

    def numel(self) -> int:
        return self.stop - self.start

    def dim(self) -> int:
        return 1

    @property
    def shape(self) -> tuple[int]:
        return (self.numel(),)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            s, e, step = key.indices(self.numel())
            if step != 1:
                raise IndexError("MemmapTokens slices take a step of 1")
            return MemmapTokens(self.mm, self.start + s, self.start + max(s, e))
        idx = np.asarray(key.cpu() if torch.is_tensor(key) else key, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.numel()):
            raise IndexError(f"token index outside 0..{self.numel() - 1}")
        if idx.ndim == 2 and idx.shape[1] and (idx[:, -1] - idx[:, 0] == idx.shape[1] - 1).all():
            # rows of consecutive tokens (the loader's blocks): each read through its own small map,
            # so the pages the kernel maps around a read stay within the row and leave with it
            out = np.empty(idx.shape, dtype=np.int64)
            size = self.mm.dtype.itemsize
            for r, a in enumerate(idx[:, 0] + self.start + self.mm.offset // size):
                out[r] = np.memmap(self.mm.filename, self.mm.dtype, "r", offset=int(a) * size, shape=(idx.shape[1],))
            return torch.from_numpy(out)
        return torch.from_numpy(self.mm[idx + self.start].astype(np.int64))

    def long(self) -> torch.Tensor:
        return torch.from_numpy(self.mm[self.start : self.stop].astype(np.int64))


class Prepared:
    """An opened prepared directory: the token stream (memory-mapped) and the document index."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError) as e:
            raise NestlmError(f"data {path}: cannot read {META} ({e}); prepare it again") from None
        if self.meta.get("format") != FORMAT:
            raise NestlmError(f"data {path}: {META} is not a nestlm token shard index")
        shard = self.path / self.meta["shards"][0]
        n = int(self.meta["tokens"])
        dtype = np.dtype(self.meta["dtype"])
        if not shard.is_file() or shard.stat().st_size != n * dtype.itemsize:
            raise NestlmError(f"data {path}: {shard.name} is missing or does not hold {n} tokens; prepare it again")
        self.mm = np.memmap(shard, dtype=dtype, mode="r", shape=(n,))
        self.offsets = np.load(self.path / "docs.npy", mmap_mode="r")
        self.context = np.load(self.path / "context.npy", mmap_mode="r")
        has_spans = (self.path / "spans.npy").is_file()
        self.spans = np.load(self.path / "spans.npy", mmap_mode="r") if has_spans else np.zeros((0, 3), np.int64)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def check_vocab(self, vocab: int | None) -> None:
        if vocab is not None and self.vocab_size > vocab:
            raise NestlmError(
                f"data {self.path} was prepared for a vocabulary of {self.vocab_size}, the model has {vocab}: "
                "it was tokenized for another model"
            )

    def tokens(self) -> MemmapTokens:
        return MemmapTokens(self.mm)

    def documents(self, completion_only: bool = False, loss: str | None = None) -> list[tuple[Any, ...]]:
        """Every document as sources.load_documents gives them (read into memory): (ids, n_context),
        or for a record with trained spans (ids, trained, "DIR document i")."""
        loss = loss or ("completion" if completion_only else "all")
        if loss != "all" and not self.meta.get("has_prompts"):
            raise NestlmError(
                f"data.loss: {loss} needs documents with a prompt and a completion; {self.path} has none "
                "(prepare conversations, prompt/completion records or reasoning:* data, or use data.loss: all)"
            )
        first = np.searchsorted(self.spans[:, 0], self.offsets) if loss != "all" else None  # each document's spans
        out: list[tuple[Any, ...]] = []
        for i in range(len(self.context)):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            ids = torch.from_numpy(self.mm[a:b].astype(np.int64))
            if loss == "all" or first[i] == first[i + 1]:
                out.append((ids, int(self.context[i]) if loss != "all" else 0))
                continue
            sp = [(int(s) - a, int(e) - a, bool(last)) for s, e, last in self.spans[first[i] : first[i + 1]]]
            out.append((ids, trained_mask(ids.numel(), sp, loss), f"{self.path} document {i}"))
        return out
