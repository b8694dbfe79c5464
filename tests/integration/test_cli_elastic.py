"""`nestlm importance` and `nestlm prune` through the CLI: outputs and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cli import main
from tests.conftest import make_hf


@pytest.fixture(scope="module")
def ranked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    hf = make_hf(root / "hf", hidden_size=64, intermediate_size=96, vocab_size=101)
    data = root / "calib.jsonl"
    g = torch.Generator().manual_seed(0)
    data.write_text(
        "".join(json.dumps({"input_ids": torch.randint(0, 101, (300,), generator=g).tolist()}) + "\n" for _ in range(8))
    )
    out = root / "ranked"
    assert (
        main(
            [
                "importance",
                "--model",
                str(hf),
                "--data",
                str(data),
                "--out",
                str(out),
                "--seq-len",
                "64",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    return hf, data, out


def test_importance_writes_reordered_checkpoint(ranked, capsys: pytest.CaptureFixture) -> None:
    hf, _, out = ranked
    imp = json.loads((out / "importance.json").read_text())
    assert imp["reordered"] and sorted(imp["layer_order"]) == list(range(5))
    a, b = nestlm.load(hf), nestlm.load(out)
    ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max() <= 1e-5
    h = torch.tensor(imp["hidden"])
    assert torch.all(h[:-1] >= h[1:])  # descending after the reorder


def test_prune_hits_the_budget(ranked, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, out = ranked
    total = nestlm.load(out).num_parameters()
    assert main(["prune", "--model", str(out), "--budget", "0.6", "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "hidden=" in printed and "parameters:" in printed
    n = nestlm.load(tmp_path / "p").num_parameters()
    assert abs(n / (0.6 * total) - 1) <= 0.02


def _err(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nestlm: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input(ranked, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hf, data, out = ranked
    o = str(tmp_path / "o")
    assert "cannot be reached" in _err(capsys, ["prune", "--model", str(out), "--budget", "0.01", "--out", o])
    assert "needs a model reordered by importance" in _err(
        capsys, ["prune", "--model", str(hf), "--budget", "0.5", "--out", o]
    )
    assert "is not a fraction" in _err(capsys, ["prune", "--model", str(out), "--budget", "half", "--out", o])
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    assert "fewer than one sequence" in _err(
        capsys, ["importance", "--model", str(hf), "--data", str(short), "--out", o, "--seq-len", "64"]
    )
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 100)
    assert "no tokenizer" in _err(capsys, ["importance", "--model", str(hf), "--data", str(text), "--out", o])
    assert "does not exist" in _err(
        capsys, ["importance", "--model", str(hf), "--data", str(tmp_path / "none"), "--out", o]
    )
    assert "not empty" in _err(capsys, ["importance", "--model", str(hf), "--data", str(data), "--out", str(out)])
    assert not (tmp_path / "o").exists()
