"""Temporary token stream + block loader (to be replaced by nestlm.train.data)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Any

import torch

from ..errors import NestlmError


def is_pretokenized(source: str) -> bool:
    p = Path(source)
    if p.suffix != ".jsonl" or not p.is_file():
        return False
    with open(p) as f:
        for line in f:
            if line.strip():
                return "input_ids" in json.loads(line)
    return False


def _texts(source: str, max_bytes: int | None, num_problems: int, seed: int) -> list[str]:
    if source.startswith("reasoning"):
        from ..eval import reasoning

        variant = source.split(":", 1)[1] if ":" in source else "short"
        return [p.text for p in reasoning.train_problems(num_problems, variant=variant, start=seed * num_problems)]
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    else:
        p = Path(source)
        if not p.exists():
            raise NestlmError(
                f"data {source} does not exist; give a text file, a directory, .jsonl, .parquet or stdlib"
            )
        files = (
            sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".txt", ".md", ".py", ".rst"))
            if p.is_dir()
            else [p]
        )
    out, total = [], 0
    for f in files:
        if f.suffix == ".jsonl":
            for i, line in enumerate(f.read_text().splitlines()):
                if not line.strip():
                    continue
                rec = json.loads(line)
                if "text" not in rec:
                    raise NestlmError(f"{f} line {i + 1} has no 'text' field")
                out.append(rec["text"])
        else:
            t = f.read_text(errors="replace")
            out.append(t)
            total += len(t)
        if max_bytes and total >= max_bytes:
            break
    if not out or not any(out):
        raise NestlmError(f"data {source} holds no text")
    return out


def load_tokens(
    source: str, tokenizer: Any, max_bytes: int | None = None, num_problems: int = 20000, seed: int = 0
) -> torch.Tensor:
    if is_pretokenized(source):
        ids: list[int] = []
        for line in Path(source).read_text().splitlines():
            if line.strip():
                ids.extend(json.loads(line)["input_ids"])
        return torch.tensor(ids, dtype=torch.long)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = []
    for t in _texts(source, max_bytes, num_problems, seed):
        ids.extend(tokenizer.encode(t))
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class BlockLoader:
    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        val_fraction: float = 0.02,
        rank: int = 0,
        world: int = 1,
        name: str = "data",
    ) -> None:
        n = (tokens.numel() - 1) // seq_len
        n_val = max(1, int(n * val_fraction)) if val_fraction > 0 else 0
        if n - n_val < 1:
            raise NestlmError(
                f"data {name} has {tokens.numel()} tokens, fewer than one block of seq_len+1={seq_len + 1} "
                "(plus the validation split); give more data or a shorter seq_len"
            )
        if batch_size % world:
            raise NestlmError(f"batch_size {batch_size} must be divisible by the {world} processes")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.n_train = n - n_val
        self.val_idx = list(range(self.n_train, n))
        self.epoch, self.pos = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(self.n_train, generator=g)

    def _block(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.seq_len
        chunk = self.tokens[s : s + self.seq_len + 1]
        return chunk[:-1], chunk[1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = []
        for _ in range(self.batch_size):
            if self.pos >= self.n_train:
                self.epoch += 1
                self.pos = 0
                self._perm = self._make_perm()
            idx.append(int(self._perm[self.pos]))
            self.pos += 1
        per = self.batch_size // self.world
        idx = idx[self.rank * per : (self.rank + 1) * per]
        xs, ys = zip(*(self._block(i) for i in idx), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def val_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        per = max(1, self.batch_size // self.world)
        out = []
        for b in range(n):
            idx = self.val_idx[b * per : (b + 1) * per]
            if not idx:
                break
            xs, ys = zip(*(self._block(i) for i in idx), strict=True)
            out.append((torch.stack(xs), torch.stack(ys)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.epoch, self.pos = st["epoch"], st["pos"]
        self._perm = self._make_perm()
