"""Training batches: token streams or documents -> packed blocks or rows -> deterministic batches.

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

Batches of rows are ``(inputs, targets, segments)``: ``segments`` (B, seq_len) numbers the
documents of each row, which the model takes as ``segment_ids`` so that no document sees
another (attention, Mamba state, RoPE positions restart), and a document's first token is
never a target (nothing of its own document comes before it). Training on packed rows is
then training on the documents alone, one per row. Batches of a stream are ``(inputs, targets)``.
"""

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import NestlmError


# ----------------------------------------------------------------------------- packing
def check_fits(docs: Sequence[tuple[Any, ...]], seq_len: int) -> None:
    """Refuse, in one line naming it, a record (a document with a ``where``) longer than a row:
    split across rows, its later part would be trained without the prompt it answers."""
    for ids, _, *where in docs:
        if where and ids.numel() > seq_len + 1:
            raise NestlmError(
                f"{where[0]} is {ids.numel():,} tokens, longer than a row of seq_len + 1 = {seq_len + 1:,}: packing: "
                "rows does not split a conversation or prompt/completion record; raise seq_len or leave it out"
            )


class RowDataset:
    """Whole documents packed greedily into rows of ``seq_len + 1`` tokens, each row starting
    at a document's start; the rest of a row is ``pad_id`` and is never a target.

    A document is ``(ids, n_context)``: its first ``n_context`` tokens are never targets, or a
    record ``(ids, trained, where)`` with ``trained`` a bool per token (e.g. the assistant turns),
    which is never split across rows (see :func:`check_fits`).
    ``ds.batch(indices)`` gives (inputs, targets) like :class:`TokenDataset`, with targets
    ``IGNORE`` (-100, what ``cross_entropy`` skips) at padding, context-only tokens and each
    document's first token; ``ds.segments(indices)`` the document ids of the inputs.
    """

    IGNORE = -100

    def __init__(self, docs: Sequence[tuple[Any, ...]], seq_len: int, pad_id: int = 0) -> None:
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise NestlmError(f"seq_len must be a positive int, got {seq_len!r}")
        check_fits(docs, seq_len)
        self.seq_len, width = seq_len, seq_len + 1
        rows: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        cur_ids: list[torch.Tensor] = []
        cur_loss: list[torch.Tensor] = []
        used = 0
        for ids, n_ctx, *_ in docs:
            loss = n_ctx.bool() if torch.is_tensor(n_ctx) else torch.arange(ids.numel()) >= n_ctx  # targets
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
        self.doc = torch.zeros((self.n, width), dtype=torch.int16)  # document j of its row; padding: one more
        self.used = torch.zeros(self.n, dtype=torch.long)  # tokens of documents in each row (the rest: padding)
        for r, (parts, losses) in enumerate(rows):
            row_ids, row_loss = torch.cat(parts), torch.cat(losses)
            lengths = torch.tensor([p.numel() for p in parts])
            self.used[r] = row_ids.numel()
            self.tokens[r, : row_ids.numel()] = row_ids
            self.loss[r, : row_ids.numel()] = row_loss
            self.loss[r, lengths.cumsum(0) - lengths] = False  # a document's first token: nothing of it before
            self.doc[r] = torch.arange(len(parts) + 1, dtype=torch.int16).repeat_interleave(
                torch.cat([lengths, torch.tensor([width - row_ids.numel()])])
            )

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

    def segments(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """(len(indices), seq_len) LongTensor: which document of its row each input token belongs to."""
        return self.doc[torch.as_tensor(indices, dtype=torch.long).reshape(-1), :-1].long()

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch([i])
        return x[0], y[0]


def take(ds: Any, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The batch of ``indices``: (inputs, targets), and for rows the segments (the model's segment_ids)."""
    return (*ds.batch(indices), ds.segments(indices)) if isinstance(ds, RowDataset) else ds.batch(indices)


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
            # = Generator.permutation(n_train), in uint32 when it fits: half the memory for a large corpus
            dtype = np.uint32 if self.n_train < 2**32 else np.int64
            self._perm = np.arange(self.n_train, dtype=dtype)
            np.random.Generator(np.random.PCG64(ss)).shuffle(self._perm)
            self._perm_epoch = epoch
        return self._perm

    def next_global_indices(self, n: int | None = None) -> list[int]:
        """The training block indices of the next GLOBAL batch, or of the next ``n`` blocks (advances the position)."""
        out = []
        for _ in range(self.batch_size if n is None else n):
            if self.pos >= self.n_train:
                self.epoch, self.pos = self.epoch + 1, 0
            out.append(int(self.permutation(self.epoch)[self.pos]))
            self.pos += 1
        return out

    def _shard(self, indices: list[int]) -> list[int]:
        per = len(indices) // self.world
        return indices[self.rank * per : (self.rank + 1) * per]

    # ------------------------------------------------------------ batches
    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """This rank's (inputs, targets[, segments]) of the next global batch, each (batch_size // world, seq_len)."""
        return take(self.blocks.train, self._shard(self.next_global_indices()))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield self.next_batch()

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, ...]]:
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
            out.append(take(self.blocks.val, self._shard(glob)))
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


class BlendLoader:
    """Global batches mixed from several sources with weights (a Megatron data blend), resumable.

    Each source has its own :class:`BlockLoader` (global indices, one process's view of the
    whole batch). Which source fills each of the ``batch_size`` places of global batch ``k`` is
    drawn from ``(seed, k)`` with the normalised weights, so the mix is the same on every rank
    and every run; each source then gives its next blocks in its own shuffled order. Process
    ``rank`` takes its contiguous chunk of the global batch. ``state_dict()`` is the batch count
    plus every source's position."""

    def __init__(
        self, loaders: Sequence[BlockLoader], weights: Sequence[float], seed: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if len(loaders) != len(w) or not len(w) or (w < 0).any() or w.sum() <= 0:
            raise NestlmError(f"a data blend needs one weight >= 0 per source, not all 0; got {list(weights)}")
        self.loaders, self.weights, self.seed = list(loaders), w / w.sum(), seed
        self.batch_size, self.seq_len = loaders[0].batch_size, loaders[0].seq_len
        if self.batch_size % world:
            raise NestlmError(f"batch_size {self.batch_size} must be divisible by the {world} processes")
        self.rank, self.world, self.step = rank, world, 0

    def sources_of(self, k: int) -> np.ndarray:
        """The source of each place of global batch ``k`` (a pure function of seed and k)."""
        ss = np.random.SeedSequence([self.seed % 2**64, k, 0x626C656E64])
        return np.random.Generator(np.random.PCG64(ss)).choice(len(self.loaders), self.batch_size, p=self.weights)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        src = self.sources_of(self.step)
        self.step += 1
        places: list[tuple[int, int]] = [(0, 0)] * self.batch_size
        for s, loader in enumerate(self.loaders):
            where = np.flatnonzero(src == s)
            for p, i in zip(where, loader.next_global_indices(len(where)), strict=True):
                places[p] = (s, i)
        per = self.batch_size // self.world
        mine = places[self.rank * per : (self.rank + 1) * per]
        rows = any(isinstance(ld.blocks.train, RowDataset) for ld in self.loaders)
        parts = []
        for s, i in mine:  # one row at a time keeps the order; rows are few
            b = take(self.loaders[s].blocks.train, [i])
            parts.append(b + (torch.zeros_like(b[0]),) if rows and len(b) == 2 else b)  # a block: one document
        return tuple(torch.cat(t) for t in zip(*parts, strict=True))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield self.next_batch()

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, ...]]:
        """Each source's validation batches (this rank's chunk), sources in order."""
        per = self.batch_size // self.world
        out = []
        for loader in self.loaders:
            for b in loader.val_batches(max(1, n // len(self.loaders))):
                out.append(tuple(t[self.rank * per : (self.rank + 1) * per] for t in b))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"blend_step": self.step, "sources": [ld.state_dict() for ld in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "sources" not in state or len(state["sources"]) != len(self.loaders):
            raise NestlmError("the saved data position is not for this blend of sources; the run cannot resume exactly")
        for ld, st in zip(self.loaders, state["sources"], strict=True):
            ld.load_state_dict(st)
        self.step = int(state["blend_step"])
