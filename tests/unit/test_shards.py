"""Prepared (memory-mapped) token shards and data blends: same tokens as the sources, resumable, deterministic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nestlm.cli import main
from nestlm.tokenizer import ByteTokenizer
from nestlm.train.loader import BlendLoader, BlockLoader, PackedBlocks
from nestlm.train.shards import META, MemmapTokens, Prepared, prepare, write_raw
from nestlm.train.sources import load_documents, load_tokens


@pytest.fixture()
def text_dir(tmp_path: Path) -> Path:
    d = tmp_path / "texts"
    d.mkdir()
    for i in range(5):
        (d / f"{i}.txt").write_text(f"document {i}: " + "lorem ipsum dolor sit amet " * (20 + 7 * i))
    return d


def test_prepared_tokens_equal_the_sources(text_dir: Path, tmp_path: Path) -> None:
    tok = ByteTokenizer()
    meta = prepare([str(text_dir), "reasoning:short"], tmp_path / "p", tok, "bytes", num_problems=6)
    p = Prepared(tmp_path / "p")
    assert meta["dtype"] == "uint16" and p.mm.dtype == np.uint16 and meta["documents"] == 5 + 6
    expected = torch.cat([load_tokens(text_dir, tok), load_tokens("reasoning:short", tok, num_problems=6)])
    assert torch.equal(p.tokens().long(), expected)
    # documents and their prompts, for data.loss: completion
    docs = p.documents(completion_only=True)
    ref = load_documents("reasoning:short", tok, num_problems=6, completion_only=True)
    assert all(n == 0 for _, n in docs[:5])
    for (a, n), (b, m) in zip(docs[5:], ref, strict=True):
        assert torch.equal(a, b) and n == m > 0


def test_uint32_when_the_vocabulary_needs_it(tmp_path: Path) -> None:
    write_raw(tmp_path / "big", np.array([0, 70000, 131071, 5]), vocab_size=131072, doc_len=2)
    p = Prepared(tmp_path / "big")
    assert p.mm.dtype == np.uint32 and p.tokens().long().tolist() == [0, 70000, 131071, 5]
    assert list(p.offsets) == [0, 2, 4]


def test_memmap_loader_draws_the_in_memory_batches_and_resumes(tmp_path: Path) -> None:
    toks = np.random.default_rng(0).integers(0, 259, 20000)
    write_raw(tmp_path / "d", toks, vocab_size=259, doc_len=100)
    mm = Prepared(tmp_path / "d").tokens()
    a = BlockLoader(PackedBlocks(mm, 32, 0.05), 32, 8, seed=3)
    b = BlockLoader(torch.from_numpy(toks), 32, 8, seed=3, val_fraction=0.05)
    for _ in range(5):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert all(torch.equal(u[0], v[0]) for u, v in zip(a.val_batches(2), b.val_batches(2), strict=True))
    c = BlockLoader(PackedBlocks(Prepared(tmp_path / "d").tokens(), 32, 0.05), 32, 8, seed=3)
    c.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert torch.equal(c.next_batch()[0], a.next_batch()[0])
    assert isinstance(mm[10:20], MemmapTokens) and mm[10:20].long().tolist() == toks[10:20].tolist()


def _blend(seed: int = 0, rank: int = 0, world: int = 1) -> BlendLoader:
    a = BlockLoader(torch.arange(0, 5000) % 100, 16, 8, seed=1)  # ids < 100
    b = BlockLoader(torch.arange(0, 5000) % 100 + 100, 16, 8, seed=2)  # ids >= 100
    return BlendLoader([a, b], [0.7, 0.3], seed=seed, rank=rank, world=world)


def test_blend_mixes_by_weight_deterministically_and_resumes() -> None:
    bl = _blend()
    rows = [bl.next_batch()[0] for _ in range(200)]
    share_a = float(torch.cat(rows)[:, 0].lt(100).float().mean())
    assert abs(share_a - 0.7) < 0.03
    again = _blend()
    assert all(torch.equal(r, again.next_batch()[0]) for r in rows)
    other = _blend(seed=1)
    assert not all(torch.equal(r, other.next_batch()[0]) for r in rows[:5])
    # resume: a fresh blend given the state continues exactly
    state = json.loads(json.dumps(bl.state_dict()))
    nxt = [bl.next_batch() for _ in range(3)]
    res = _blend()
    res.load_state_dict(state)
    assert all(torch.equal(res.next_batch()[1], y) for _, y in nxt)
    # two ranks' chunks make up the one-process batch
    r0, r1, one = _blend(rank=0, world=2), _blend(rank=1, world=2), _blend()
    for _ in range(3):
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), one.next_batch()[0])


def test_prepare_cli_and_bad_input(tmp_path: Path, text_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ok"
    assert main(["data", "prepare", str(text_dir), "--out", str(out), "--tokenizer", "bytes"]) == 0
    assert (out / META).is_file() and "prepared" in capsys.readouterr().out
    bad = tmp_path / "bad"
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--out", str(bad), "--tokenizer", "bytes"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nestlm: error:") and len(err.strip().splitlines()) == 1
    assert not bad.exists() and not any(p.name.startswith(".bad") for p in tmp_path.iterdir())
    assert main(["data", "prepare", str(text_dir), "--out", str(out), "--tokenizer", "bytes"]) == 2  # not over it
