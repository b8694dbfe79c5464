"""Training data: reading sources, packing, validation split, deterministic resumable sharded batches."""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from nestlm.errors import NestlmError
from nestlm.eval import reasoning
from nestlm.tokenizer import ByteTokenizer
from nestlm.train import data

BT = ByteTokenizer()


def stream(n: int = 5000) -> torch.Tensor:
    """Distinct token values, so that every token's position can be told from its value."""
    return torch.arange(10, 10 + n)


def draw(loader: data.BlockLoader, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(k)]


def same(a: list, b: list) -> bool:
    """Equal batches: inputs and targets (and the segments of packed rows)."""
    pairs = list(zip(a, b, strict=True)) if len(a) == len(b) else []
    return len(a) == len(b) and all(len(u) == len(v) and all(map(torch.equal, u, v)) for u, v in pairs)


# ----------------------------------------------------------------------------- packing
def test_packing_round_trip() -> None:
    tokens = torch.randint(0, 259, (1003,))
    ds = data.TokenDataset(tokens, seq_len=10)
    assert len(ds) == 100  # (1003 - 1) // 10
    x, y = ds.batch(range(len(ds)))
    assert x.shape == y.shape == (100, 10) and x.dtype == y.dtype == torch.long
    assert torch.equal(torch.cat([x.reshape(-1), y[-1, -1:]]), tokens[:1001])  # blocks rebuild the stream
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    xi, yi = ds[7]
    assert torch.equal(xi, x[7]) and torch.equal(yi, y[7])
    assert len(data.TokenDataset(tokens[:10], 10)) == 0


def test_train_and_val_are_disjoint_at_every_seq_len() -> None:
    tokens = stream(4000)
    cuts = set()
    for seq_len in (16, 64):
        loader = data.BlockLoader(tokens, seq_len, batch_size=4, val_fraction=0.1)
        cuts.add(loader.blocks.split_at)
        seen_train = set()
        for _ in range(loader.n_train // 4 + 1):
            x, y = loader.next_batch()
            seen_train |= set(x.flatten().tolist()) | set(y.flatten().tolist())
        seen_val = set()
        for x, y in loader.val_batches(100):
            seen_val |= set(x.flatten().tolist()) | set(y.flatten().tolist())
        assert loader.n_val >= 1 and seen_val and seen_train.isdisjoint(seen_val)
        assert min(seen_val) == 10 + loader.blocks.split_at  # the validation tail
        assert len(seen_train) == loader.n_train * seq_len + 1  # one epoch covered every training block
    assert cuts == {3600}  # one boundary for every curriculum stage: no stage trains on validation text
    assert data.BlockLoader(tokens, 16, 4, val_fraction=0.0).val_batches(3) == []


def test_order_is_deterministic_per_seed() -> None:
    tokens = stream()
    a = draw(data.BlockLoader(tokens, 32, 8, seed=1), 6)
    b = draw(data.BlockLoader(tokens, 32, 8, seed=1), 6)
    c = draw(data.BlockLoader(tokens, 32, 8, seed=2), 6)
    assert same(a, b) and not same(a, c)
    loader = data.BlockLoader(tokens, 32, 8, seed=1)
    assert not (loader.permutation(0) == loader.permutation(1)).all()  # reshuffled every epoch
    assert sorted(loader.permutation(1).tolist()) == list(range(loader.n_train))


def test_resume_gives_the_same_next_batches() -> None:
    tokens = stream()
    a = data.BlockLoader(tokens, 32, 8, seed=3)
    draw(a, 25)  # past the first epoch (153 blocks)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["epoch"] == 1
    expected = draw(a, 30)
    b = data.BlockLoader(tokens, 32, 8, seed=3)
    b.load_state_dict(state)
    assert same(draw(b, 30), expected)
    assert not same(draw(data.BlockLoader(tokens, 32, 8, seed=3), 30), expected)
    with pytest.raises(NestlmError, match="seq_len=32, this loader has seq_len=64.*cannot resume exactly"):
        data.BlockLoader(tokens, 64, 8, seed=3).load_state_dict(state)
    old = data.BlockLoader(tokens, 32, 8, seed=3)
    old.load_state_dict({"epoch": state["epoch"], "pos": state["pos"]})  # positions without the checks load too
    assert same(draw(old, 2), expected[:2])


def test_ranks_split_the_global_batch() -> None:
    tokens = stream()
    one = data.BlockLoader(tokens, 16, 8, seed=5, val_fraction=0.05)
    ranks = [data.BlockLoader(tokens, 16, 8, seed=5, val_fraction=0.05, rank=r, world=2) for r in range(2)]
    for _ in range(40):
        x, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert parts[0][0].shape == (4, 16)
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    for (x, _), p0, p1 in zip(one.val_batches(3), ranks[0].val_batches(3), ranks[1].val_batches(3), strict=True):
        assert torch.equal(torch.cat([p0[0], p1[0]]), x)
    with pytest.raises(NestlmError, match="batch_size 6 must be divisible by the 4 processes"):
        data.BlockLoader(tokens, 16, 6, rank=0, world=4)


# ----------------------------------------------------------------------------- errors
def test_short_data_errors() -> None:
    with pytest.raises(NestlmError, match=r"data tiny has 5 tokens, fewer than one block of seq_len\+1=9; give more"):
        data.BlockLoader(stream(5), 8, 2, name="tiny")
    with pytest.raises(NestlmError, match=r"leaves 8, fewer than one training block of seq_len\+1=9.*val_fraction=0"):
        data.BlockLoader(stream(17), 8, 2, val_fraction=0.1)
    assert data.BlockLoader(stream(17), 8, 2, val_fraction=0.0).n_train == 2


def test_missing_and_empty_sources(tmp_path: Path) -> None:
    with pytest.raises(NestlmError, match=r"data .*nope\.txt does not exist; give a text file, a directory"):
        data.load_tokens(tmp_path / "nope.txt", BT)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(NestlmError, match=r"empty\.txt holds no text"):
        data.load_tokens(tmp_path / "empty.txt", BT)
    with pytest.raises(NestlmError, match=r"empty\.txt holds no text"):
        data.read_texts(tmp_path / "empty.txt")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\0\1")
    with pytest.raises(NestlmError, match=r"directory .*d has no data files \(\*\.txt"):
        data.read_texts(tmp_path / "d")


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "hello"}\n\n{"body": "x"}\n')
    with pytest.raises(NestlmError, match=r"a\.jsonl line 3 has no 'text' field \(its keys: 'body'\)"):
        data.read_texts(f)
    f.write_text('{"text": "hello"}\n{"text": oops}\n')
    with pytest.raises(NestlmError, match=r"a\.jsonl line 2 is not valid JSON"):
        data.load_tokens(f, BT)
    f.write_text('{"input_ids": [5, 6]}\n{"text": "x"}\n')
    with pytest.raises(NestlmError, match=r"line 2 has no 'input_ids' field .*line 1 has 'input_ids'"):
        data.load_tokens(f)
    f.write_text('{"input_ids": [5, "a"]}\n')
    with pytest.raises(NestlmError, match=r"line 1: 'input_ids' must be a list of integer token ids"):
        data.load_tokens(f)
    f.write_text('{"input_ids": [5, 300]}\n')
    with pytest.raises(NestlmError, match="token id 300, outside the vocabulary of 259"):
        data.load_tokens(f, vocab_size=259)


# ----------------------------------------------------------------------------- sources
def test_jsonl_text_and_input_ids(tmp_path: Path) -> None:
    t = tmp_path / "t.jsonl"
    t.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"text": "é"}) + "\n")
    assert not data.is_pretokenized(t)
    assert data.read_texts(t) == ["ab", "é"]
    assert data.load_tokens(t, BT).tolist() == [97 + 3, 98 + 3, 2, 0xC3 + 3, 0xA9 + 3, 2]  # EOS after each document
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"input_ids": [5, 6, 7]}\n{"input_ids": [8]}\n')
    assert data.is_pretokenized(ids)
    assert data.load_tokens(ids).tolist() == [5, 6, 7, 8]  # used as they are, no tokenizer needed
    assert data.load_tokens(ids, BT).tolist() == [5, 6, 7, 8]
    with pytest.raises(NestlmError, match="pre-tokenized input_ids, not text"):
        data.read_texts(ids)
    with pytest.raises(NestlmError, match="needs a tokenizer"):
        data.load_tokens(t)


def test_directory_is_recursive_and_sorted(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.md").write_text("Z")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "b" / "c.jsonl").write_text('{"text": "C"}\n')
    (tmp_path / "data.bin").write_text("no")
    (tmp_path / ".git" / "x.txt").write_text("no")
    assert data.read_texts(tmp_path) == ["A", "C", "Z"]
    assert data.read_texts(tmp_path, max_bytes=2) == ["A", "C"]


def test_stdlib_source() -> None:
    texts = data.read_texts("stdlib", max_bytes=20_000)
    joined = "".join(texts)
    assert len(joined.encode()) == 20_000 and "import " in joined and "def " in joined
    assert texts == data.read_texts("stdlib", max_bytes=20_000)  # the same on every run
    files = data.stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert not any({"test", "tests", "site-packages"} & set(f.relative_to(root).parts) for f in files)
    assert files == sorted(files, key=lambda f: f.relative_to(root).as_posix())
    tokens = data.load_tokens("stdlib", BT, max_bytes=20_000)
    assert tokens.numel() == 20_000 + len(texts)  # bytes + one EOS per document
    n0 = len(texts[0].encode())
    assert BT.decode(tokens[:n0].tolist()) == texts[0] and int(tokens[n0]) == BT.eos_token_id


def test_reasoning_source() -> None:
    tokens = data.load_tokens("reasoning:long", BT, num_problems=10, seed=2)
    expected = data.tokenize([p.text for p in reasoning.train_problems(10, "long", start=20)], BT)
    assert torch.equal(tokens, expected)
    assert data.read_texts("reasoning", num_problems=3) == [p.text for p in reasoning.train_problems(3)]
    assert data.read_texts("reasoning:short:3", num_problems=2) == [
        p.text for p in reasoning.train_problems(2, "short", 3)
    ]
    with pytest.raises(NestlmError, match=r"reasoning:VARIANT\[:DIFFICULTY\] with VARIANT one of short, long"):
        data.read_texts("reasoning:medium")


def test_generic_tokenizer_without_eos() -> None:
    class Words:
        eos_token_id = None

        def encode(self, text: str) -> list[int]:
            return [len(w) for w in text.split()]

    assert data.tokenize(["a bb", "ccc"], Words()).tolist() == [1, 2, 3]


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "d.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        NestlmError, match=r"d\.parquet is a \.parquet file, which needs pyarrow: pip install nestlm\[parquet\]"
    ):
        data.read_texts(f)


def test_parquet_with_pyarrow(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": [1, 2], "text": ["hello", "world"]}), tmp_path / "d.parquet")
    assert data.read_texts(tmp_path / "d.parquet") == ["hello", "world"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(NestlmError, match=r"no 'text' \(or 'input_ids'\) column \(its columns: body\)"):
        data.read_texts(tmp_path / "e.parquet")


def test_hf_tokenizer_batch_encoding(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from nestlm.tokenizer import HFTokenizer

    vocab = {"[UNK]": 0, "</s>": 1, "a": 2, "b": 3, "c": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    texts = ["a b c", "c z a"]
    assert hf.encode_batch(texts) == [hf.encode(t) for t in texts] == [[2, 3, 4], [4, 0, 2]]
    assert data.tokenize(texts, hf).tolist() == [2, 3, 4, 1, 4, 0, 2, 1]  # EOS = </s>


# ----------------------------------------------------------------------------- rows


def test_rows_start_at_documents_and_hold_whole_ones() -> None:
    probs = reasoning.train_problems(40)
    docs = data.load_documents("reasoning:short", BT, num_problems=40)
    assert all(ids[-1].item() == BT.eos_token_id for ids, _ in docs)
    assert [ids[:-1].tolist() for ids, _ in docs] == [BT.encode(p.text) for p in probs]
    ds = data.RowDataset(docs, seq_len=320, pad_id=BT.pad_token_id)
    starts = {BT.encode(p.text)[0] for p in probs}
    texts = []
    for r in range(len(ds)):
        row = ds.tokens[r].tolist()
        assert row[0] in starts  # every row starts at a problem's start
        real = [t for t in row if t != BT.pad_token_id]
        texts.append(BT.decode(real))
    joined = "".join(texts)
    for p in probs:  # every problem is whole, in one row
        assert sum(p.text in t for t in texts) == 1
    assert joined.count("Q: ") == 40
    assert len(ds) < 40  # short problems share rows


def test_rows_mask_padding_and_prompts() -> None:
    probs = reasoning.train_problems(12)
    docs = data.load_documents("reasoning:short", BT, num_problems=12, completion_only=True)
    assert [n for _, n in docs] == [len(BT.encode(p.prompt)) for p in probs]
    ds = data.RowDataset(docs, seq_len=300, pad_id=BT.pad_token_id)
    x, y = ds.batch(list(range(len(ds))))
    assert x.shape == y.shape == (len(ds), 300)
    trained = BT.decode([t for t in y.flatten().tolist() if t != data.RowDataset.IGNORE])
    # exactly the solutions (+ EOS) are targets: no question text, no padding
    assert trained.count("Q:") == 0 and trained.count("Answer:") == 12
    assert trained == "".join(p.cot for p in probs)
    assert bool((y[x == BT.pad_token_id] == data.RowDataset.IGNORE).all())
    # with loss on every token, only padding is ignored
    ds_all = data.RowDataset(data.load_documents("reasoning:short", BT, num_problems=12), 300, BT.pad_token_id)
    _, y_all = ds_all.batch(list(range(len(ds_all))))
    n_q = BT.decode([t for t in y_all.flatten().tolist() if t != -100]).count("Q:")
    # a document's first token has nothing of its own document before it (segment ids): never a target
    assert n_q == 0 and len(ds_all) < 12


def test_long_document_fills_consecutive_rows_and_loader_resumes() -> None:
    docs = [(torch.arange(10, 60), 0), (torch.arange(100, 105), 0)]
    ds = data.RowDataset(docs, seq_len=19, pad_id=0)
    assert ds.tokens[:3, :].flatten()[:50].tolist() == list(range(10, 60))  # 50 tokens over rows of 20
    assert ds.tokens[2, 10:15].tolist() == list(range(100, 105))  # the short one fits after the tail
    packed = data.PackedRows(data.load_documents("reasoning:short", BT, num_problems=200), 320, 0.05)
    assert len(packed.val) >= 1 and len(packed.train) > len(packed.val)
    a = data.BlockLoader(packed, 320, batch_size=4, seed=3)
    draw(a, 3)
    state = a.state_dict()
    b = data.BlockLoader(packed, 320, batch_size=4, seed=3)
    b.load_state_dict(state)
    assert same(draw(a, 4), draw(b, 4))


def test_reasoning_difficulty_list_and_completion_errors() -> None:
    texts = data.read_texts("reasoning:short:1,3", num_problems=4)
    assert texts[0] == reasoning.train_problems(1, "short", 1)[0].text
    assert texts[1] == reasoning.train_problems(2, "short", 3)[1].text
    with pytest.raises(NestlmError, match="DIFFICULTY within"):
        data.read_texts("reasoning:short:1,9")
    with pytest.raises(NestlmError, match="needs documents with a prompt"):
        data.load_documents("stdlib", BT, completion_only=True)
