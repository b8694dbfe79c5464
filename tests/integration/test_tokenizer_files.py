"""Every model directory nestlm writes carries its source's tokenizer and generation config.

One test per command that writes a model directory (importance, prune, slice, train, export):
the files are there, byte for byte, and ``nestlm generate --model OUT`` works on the output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cli import main
from nestlm.tokenizer import ByteTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ELASTIC = Path(__file__).resolve().parent.parent / "data" / "elastic-v1"
TOKENIZER_FILES = {
    "nestlm_tokenizer.json": json.dumps({"type": "bytes"}),
    "tokenizer_config.json": json.dumps({"eos_token": "</s>", "chat_template": "{{ messages[0]['content'] }}"}),
    "special_tokens_map.json": json.dumps({"eos_token": "</s>"}),
    "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "generation_config.json": json.dumps({"eos_token_id": 2, "pad_token_id": 0}),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level parent directory with a full set of tokenizer and generation files."""
    cfg = nestlm.ModelConfig.from_pattern(
        "M-*-",
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=32,
        mamba_heads=4,
        mamba_head_dim=8,
        mamba_groups=2,
        d_state=8,
        attn_heads=4,
        kv_heads=2,
        attn_head_dim=8,
        ffn=64,
        mamba_chunk_size=16,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tok") / "src"
    nestlm.HybridLM(cfg).save_pretrained(str(d))
    for name, text in TOKENIZER_FILES.items():
        (d / name).write_text(text)
    return d


def _assert_carries(out: Path, src: Path, names: list[str] | None = None) -> None:
    for name in names or list(TOKENIZER_FILES):
        assert (out / name).is_file(), f"{out} lacks {name}"
        assert (out / name).read_bytes() == (src / name).read_bytes(), name


def _assert_carries_hf(out: Path, src: Path) -> None:
    """An HF export of a byte-level source: every file carried, but tokenizer_config.json, which
    export_hf writes for transformers (beside a tokenizer.json) with the source's EOS and chat template."""
    _assert_carries(out, src, [n for n in TOKENIZER_FILES if n != "tokenizer_config.json"])
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "</s>" and cfg.get("chat_template") and (out / "tokenizer.json").is_file()


def _generate(model_dir: Path, capsys: pytest.CaptureFixture, budget: str | None = None) -> None:
    capsys.readouterr()
    args = ["generate", "--model", str(model_dir), "--prompt", "1 + 1 =", "--max-new-tokens", "3"]
    assert main(args + (["--budget", budget] if budget else [])) == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def ranked(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "ranked"
    args = ["importance", "--model", str(source), "--data", "reasoning:short", "--out", str(out)]
    assert main(args + ["--seq-len", "32", "--num-samples", "4", "--batch-size", "2", "--depth-batches", "1"]) == 0
    return out


def test_importance_output_carries_the_tokenizer(ranked: Path, source: Path, capsys: pytest.CaptureFixture) -> None:
    _assert_carries(ranked, source)
    _generate(ranked, capsys)


def test_prune_output_carries_the_tokenizer(
    ranked: Path, source: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["prune", "--model", str(ranked), "--budget", "0.7", "--out", str(tmp_path / "p")]) == 0
    _assert_carries(tmp_path / "p", source)
    _generate(tmp_path / "p", capsys)
    assert (
        main(["prune", "--model", str(ranked), "--budget", "0.7", "--out", str(tmp_path / "h"), "--format", "hf"]) == 0
    )
    _assert_carries_hf(tmp_path / "h", source)


def test_slice_output_carries_the_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "elastic"
    shutil.copytree(ELASTIC, src)
    for name, text in TOKENIZER_FILES.items():
        if name != "nestlm_tokenizer.json":
            (src / name).write_text(text)
    _generate(src, capsys, budget="50")
    assert main(["slice", "--model", str(src), "--budget", "50", "--out", str(tmp_path / "s50")]) == 0
    _assert_carries(tmp_path / "s50", src)
    _generate(tmp_path / "s50", capsys)
    _serve_one_completion(tmp_path / "s50")
    assert main(["slice", "--model", str(src), "--budget", "75", "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    _assert_carries_hf(tmp_path / "hf", src)
    assert nestlm.load(tmp_path / "hf").num_parameters() == nestlm.load(src).num_parameters(budget="75")


def _serve_one_completion(model_dir: Path) -> None:
    """nestlm serve on a sliced directory: its tokenizer and chat template answer a request."""
    from nestlm.serve.server import build_api
    from tests.integration.serving import Server

    server = Server(build_api(model_dir, max_context=128))
    try:
        c = server.client()
        (name,) = [m.id for m in c.models.list()]
        r = c.completions.create(model=name, prompt="1 + 1 =", max_tokens=3, temperature=0)
        assert r.usage.prompt_tokens == len("1 + 1 =") and r.choices[0].finish_reason in ("stop", "length")
        chat = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert chat.choices[0].finish_reason in ("stop", "length")
    finally:
        server.close()


def test_save_pretrained_and_export_carry_the_tokenizer(source: Path, tmp_path: Path) -> None:
    model = nestlm.load(source)
    model.save_pretrained(str(tmp_path / "again"))
    _assert_carries(tmp_path / "again", source)
    nestlm.export_hf(model, tmp_path / "hf")
    _assert_carries_hf(tmp_path / "hf", source)


def test_train_outputs_carry_the_tokenizer(source: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The elastic checkpoint and its ranked parent/ (automatic importance) carry the parent's tokenizer files."""
    out = tmp_path / "run"
    overrides = [
        f"model.path={source}",
        "model.init=null",
        "data.train=reasoning:short",
        "data.tokenizer=model",
        "data.num_problems=200",
        "elastic.budgets={full: 1.0, '75': 0.75, '60': 0.6}",
        "elastic.importance_batches=1",
        "elastic.d_router=8",
        "stages.0.steps=1",
        "stages.1.steps=1",
        "stages.0.seq_len=32",
        "stages.1.seq_len=32",
        "train.checkpoint_every=0",
        "train.threads=1",
    ]
    assert main(["train", "tiny", "--out", str(out), "--no-progress", *overrides]) == 0, capsys.readouterr().err
    _assert_carries(out, source)
    _assert_carries(out / "parent", source)
    _generate(out, capsys, budget="60")
