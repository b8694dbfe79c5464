"""Conversations and prompt/completion data through the chat template: exactly the answers are trained.

A byte-level BPE with a Qwen3-style template is built here (tests/chat_data.py); conversational
.jsonl and prompt/completion .parquet are prepared, packed into rows, and the trained tokens decoded
against the text written out by hand; a tiny elastic run trains on them, and resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nestlm.cli import main
from nestlm.config import ModelConfig
from nestlm.model import HybridLM
from nestlm.train.loader import RowDataset
from nestlm.train.shards import Prepared
from tests.chat_data import CONVERSATIONS, PC_CONVERSATIONAL, PC_PLAIN, chat_tokenizer, write_jsonl, write_parquet
from tests.conftest import dir_state

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    return {
        "tok": chat_tokenizer(root / "tok"),
        "chat": write_jsonl(root / "chat.jsonl", [r for r, *_ in CONVERSATIONS], repeat=4),
        "pc": write_parquet(root / "pc.parquet", [r for r, _ in PC_CONVERSATIONAL], repeat=4),
        "plain": write_parquet(root / "plain.parquet", [r for r, _ in PC_PLAIN], repeat=2),
        "root": root,
    }


def prepared(data: dict[str, Path], name: str, *sources: str, loss: str = "completion") -> Path:
    out = data["root"] / name
    if not out.exists():
        args = ["data", "prepare", *(str(data[s]) for s in sources), "--out", str(out)]
        assert main([*args, "--tokenizer", str(data["tok"]), "--loss", loss]) == 0
    return out


def trained_text(prep: Path, tok: Path, loss: str, seq_len: int = 256) -> tuple[str, RowDataset]:
    """The targets of every packed row, decoded in order (special tokens shown)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok))
    ds = RowDataset(Prepared(prep).documents(loss=loss), seq_len, pad_id=hf.pad_token_id)
    _, y = ds.batch(range(len(ds)))
    return hf.decode(y[y != RowDataset.IGNORE].tolist(), skip_special_tokens=False), ds


@pytest.mark.parametrize("loss", ["completion", "last_turn"])
def test_conversations_train_exactly_the_assistant_turns(loss: str, data: dict[str, Path]) -> None:
    prep = prepared(data, "prep-chat", "chat", "pc", "plain")
    text, ds = trained_text(prep, data["tok"], loss)
    by_conv = [(c if loss == "completion" or last is None else last) for _, c, last in CONVERSATIONS]
    expected = "".join(by_conv) * 4 + "".join(t for _, t in PC_CONVERSATIONAL) * 4 + "".join(t for _, t in PC_PLAIN) * 2
    assert text == expected
    assert len(ds) < len(CONVERSATIONS) * 4  # several records share a row (packing: rows)
    assert int(ds.doc.max()) >= 2
    # with data.loss: all every token but each document's first (and the padding) is a target
    text_all, _ = trained_text(prep, data["tok"], "all")
    assert len(text_all) > 2 * len(expected) and "<|im_start|>user\nWhat is 2+2?" in text_all


def test_data_show_marks_the_trained_spans(data: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "show", str(data["chat"]), "--tokenizer", str(data["tok"]), "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "\u27e6Hi! How can I help?<|im_end|>\u27e7" in out and "\u27e6<think>\nTwo plus two" in out
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in out  # the prompt, unmarked
    assert "2 rows:" in out and "tokens trained" in out and "ignored" in out
    prep = prepared(data, "prep-chat", "chat", "pc", "plain")
    assert main(["data", "show", str(prep), "--tokenizer", str(data["tok"]), "--seq-len", "256", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "documents" in out and "padding" in out
    assert "It is sunny.\n</think>\n\nSunny and 21C in Paris.<|im_end|>\u27e7" in out


def parent_with(tok: Path, out: Path) -> Path:
    """A tiny random parent whose directory carries the chat tokenizer."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()
    cfg = ModelConfig.from_pattern(
        "M-*M-", vocab_size=vocab, hidden_size=64, mamba_heads=4, mamba_head_dim=16, mamba_groups=2, d_state=16,
        attn_heads=4, kv_heads=2, attn_head_dim=16, ffn=192, mamba_chunk_size=32, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = HybridLM(cfg)
    model.reset_parameters(seed=0)
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tok / f, out / f)
    return out


def losses(out: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_tiny_elastic_run_on_chat_data_and_resume(data: dict[str, Path], tmp_path: Path) -> None:
    parent = parent_with(data["tok"], tmp_path / "parent")
    prep = prepared(data, "prep-chat", "chat", "pc", "plain")  # conversations and prompt/completion records
    ov = [
        "model.init=null", f"model.path={parent}", "data.tokenizer=model", f"data.train={prep}",
        "data.packing=rows",
        "data.loss=completion", "data.val_fraction=0.1", "stages.0.seq_len=192", "stages.1.seq_len=256",
        "stages.0.steps=4", "stages.1.steps=2", "stages.0.batch_size=4", "stages.1.batch_size=2",
        "train.checkpoint_every=2", "train.keep_last=10", "elastic.importance_batches=1", "train.tensorboard=false",
    ]  # fmt: skip
    whole = tmp_path / "whole"
    assert main(["train", "tiny", "--out", str(whole), "--no-progress", *ov]) == 0
    assert (whole / "model.safetensors").is_file() and len(losses(whole)) == 6
    assert all(torch.isfinite(torch.tensor(losses(whole))))
    # the same run stopped after its step-2 checkpoint (its later files removed), then resumed
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for p in list(cut.iterdir()):
        if p.name not in ("run.json", "recipe.yaml", "metrics.jsonl", "checkpoints", "parent"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for ck in (cut / "checkpoints").iterdir():
        if ck.name != "step-00000002":
            shutil.rmtree(ck)
    kept = [ln for ln in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(ln).get("step", 0) <= 2]
    (cut / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept if '"val"' not in ln))
    assert main(["train", "tiny", "--out", str(cut), "--no-progress", "--resume", *ov]) == 0
    assert losses(cut) == losses(whole)  # the resumed run drew the same rows from step 3 on


def test_saved_dataset_directory_is_a_source(data: dict[str, Path], tmp_path: Path) -> None:
    """A directory written by datasets' save_to_disk reads like the .jsonl it came from (the optional extra)."""
    datasets = pytest.importorskip("datasets")
    from nestlm.train.chat import ChatFormat
    from nestlm.train.sources import load_documents

    datasets.Dataset.from_list([r for r, _ in PC_CONVERSATIONAL]).save_to_disk(str(tmp_path / "saved"))
    chat = ChatFormat(data["tok"])
    docs = load_documents(tmp_path / "saved", None, loss="completion", chat=chat)
    text = "".join(chat.hf.decode(ids[keep].tolist(), skip_special_tokens=False) for ids, keep, _ in docs)
    assert text == "".join(t for _, t in PC_CONVERSATIONAL) and docs[1][2].endswith("saved row 2")


# ------------------------------------------------------------------ bad data: one line, exit 2, nothing written
BAD = {
    "no_assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "bad.jsonl line 2: the conversation has no "),
    "unknown_role": ({"messages": [{"role": "robot", "content": "x"}]}, "bad.jsonl line 2: unknown role 'robot'"),
    "missing_field": ({"body": "x"}, "bad.jsonl line 2 has no 'messages' field"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_records_are_one_line_naming_file_and_line(
    case: str, data: dict[str, Path], tmp_path: Path, capsys
) -> None:
    record, needle = BAD[case]
    good = CONVERSATIONS[0][0]
    src = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    before = dir_state(tmp_path)
    rc = main(["data", "prepare", str(src), "--out", str(tmp_path / "out"), "--tokenizer", str(data["tok"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert dir_state(tmp_path) == before and not (tmp_path / "out").exists()


def test_missing_column_template_and_long_record_are_refused(data: dict[str, Path], tmp_path: Path, capsys) -> None:
    write_parquet(tmp_path / "cols.parquet", [{"question": "x", "answer": "y"}])
    notemplate = chat_tokenizer(tmp_path / "plain-tok", template=False)
    cases = [
        (["data", "prepare", str(tmp_path / "cols.parquet"), "--tokenizer", str(data["tok"])],
         "cols.parquet has no 'text' (or 'input_ids') column (its columns: question, answer)"),
        (["data", "prepare", str(data["chat"]), "--tokenizer", str(notemplate)],
         "chat.jsonl line 1 is a conversation, and the tokenizer"),
    ]  # fmt: skip
    for argv, needle in cases:
        before = dir_state(tmp_path)
        assert main([*argv, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
        assert dir_state(tmp_path) == before
    # a conversation longer than a row: packing: rows would split it from its prompt
    parent = parent_with(data["tok"], tmp_path / "parent")
    out = tmp_path / "run"
    ov = ["model.init=null", f"model.path={parent}", "data.tokenizer=model", f"data.train={data['chat']}",
          "data.packing=rows", "data.loss=completion", "stages.0.seq_len=24"]  # fmt: skip
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *ov]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat.jsonl line 1 is" in err[0] and "longer than a row" in err[0], err
    assert not out.exists()
