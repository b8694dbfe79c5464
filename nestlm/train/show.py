"""``nestlm data show``: rows as text with the trained spans marked, and the counts of trained and
ignored tokens (as axolotl's preprocessing debug shows them), to see what training will learn.

Each document (or, with ``seq_len``, each row that ``packing: rows`` packs) is printed decoded
with its special tokens, the tokens that are targets between ``⟦`` and ``⟧``. Only the documents
the shown rows need are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import shards, sources
from .chat import ChatFormat, trained_mask
from .loader import RowDataset

OPEN, CLOSE = "\u27e6", "\u27e7"


def _documents(source: str, tokenizer: Any, chat: ChatFormat, loss: str | None) -> Iterator[tuple[Any, ...]]:
    """(ids, trained bool per token) of each document, read one at a time. ``loss`` None: the answers of
    conversations, prompt/completion records and reasoning:* problems, every token of plain text."""
    if shards.is_prepared(source):
        prepared = shards.Prepared(source)
        has = prepared.meta.get("has_prompts")
        for ids, trained, *_ in prepared.documents(loss=loss or ("completion" if has else "all")):
            yield ids, trained if torch.is_tensor(trained) else torch.arange(ids.numel()) >= trained
        return
    for ids, n_ctx, spans, _ in sources.iter_documents(source, tokenizer, loss=loss or "completion", chat=chat):
        if loss == "all" or (spans is None and not n_ctx):
            yield ids, torch.ones(ids.numel(), dtype=torch.bool)
        elif spans is not None:
            yield ids, trained_mask(ids.numel(), spans, loss or "completion")
        else:
            yield ids, torch.arange(ids.numel()) >= n_ctx


def _marked(ids: list[int], keep: list[bool], decode: Any) -> str:
    """The text of ``ids``, each run of trained tokens between the markers."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or keep[i] != keep[start]:
            text = decode(ids[start:i])
            out.append(f"{OPEN}{text}{CLOSE}" if keep[start] else text)
            start = i
    return "".join(out)


def show(
    source: str,
    tokenizer: Any,
    tokenizer_spec: str | Path,
    rows: int = 3,
    loss: str | None = None,
    chat_template: str | None = None,
    seq_len: int | None = None,
    pad_id: int = 0,
) -> list[str]:
    """The lines ``nestlm data show`` prints."""
    chat = ChatFormat(tokenizer_spec, chat_template)

    def decode(ids: list[int]) -> str:
        return chat.hf.decode(ids, skip_special_tokens=False)

    docs, shown, total = _documents(str(source), tokenizer, chat, loss), [], [0, 0, 0]
    if seq_len is None:
        for ids, keep in docs:
            shown.append((ids.tolist(), keep.tolist(), 0, 1))
            if len(shown) == rows:
                break
    else:  # enough documents to fill the rows, packed as training packs them
        picked, n = [], 0
        for ids, keep in docs:
            picked.append((ids, keep))
            n += ids.numel()
            if n > (rows + 1) * (seq_len + 1):
                break
        ds = RowDataset(picked, seq_len, pad_id) if picked else None
        for r in range(min(rows, len(ds) if ds else 0)):
            used = int(ds.used[r])
            keep = [False] + (ds.batch([r])[1][0] != RowDataset.IGNORE).tolist()  # targets: tokens 1..seq_len
            shown.append((ds.tokens[r, :used].tolist(), keep[:used], seq_len + 1 - used, int(ds.doc[r, used - 1]) + 1))
    lines = [f"{source}: trained tokens between {OPEN} and {CLOSE}"]
    for k, (ids, keep, pad, n_docs) in enumerate(shown):
        n_train = sum(keep)
        total = [total[0] + n_train, total[1] + len(ids) - n_train, total[2] + pad]
        what = f"{n_docs} documents, " if seq_len is not None else ""
        lines.append(
            f"--- row {k}: {len(ids) + pad} tokens ({what}{n_train} trained, {len(ids) - n_train} ignored"
            + (f", {pad} padding)" if pad else ")")
        )
        lines.append(_marked(ids, keep, decode))
    padding = f", {total[2]:,} padding" if total[2] else ""
    lines.append(f"{len(shown)} rows: {total[0]:,} tokens trained, {total[1]:,} ignored{padding}")
    return lines
