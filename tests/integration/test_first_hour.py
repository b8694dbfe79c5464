"""A new user's first hour: the small cuts of the CLI and the Python API, each pinned by a test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nestlm
from nestlm.cli import main

DATA = Path(__file__).resolve().parent.parent / "data" / "elastic-v1"


def test_version(capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"nestlm {version('nestlm')}"


def test_a_budget_named_by_a_number_is_that_budget() -> None:
    """budget=50 is the budget named "50" (the error used to say: unknown budget 50; known budgets: ... 50)."""
    model = nestlm.load(DATA).eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids, budget=50).logits, model(ids, budget="50").logits)
    assert model.num_parameters(budget=75) == model.num_parameters(budget="75")
    assert model.slice(50).num_parameters() == model.num_parameters(budget="50")
    assert torch.equal(
        model.generate(ids, max_new_tokens=3, budget=50), model.generate(ids, max_new_tokens=3, budget="50")
    )
    with pytest.raises(nestlm.UnknownBudgetError, match="unknown budget '60'"):
        model(ids, budget=60)


@pytest.mark.parametrize(
    "option, value, needle",
    [
        ("--max-new-tokens", "-5", "--max-new-tokens -5 is out of range: give an integer >= 1"),
        ("--temperature", "-1", "--temperature -1.0 is out of range"),
        ("--top-p", "0", "--top-p 0.0 is out of range: give in (0, 1]"),
        ("--top-k", "0", "--top-k 0 is out of range"),
    ],
)
def test_generate_refuses_out_of_range_options(capsys: pytest.CaptureFixture, option: str, value: str, needle: str):
    """One line, exit 2, before the model is even loaded (a missing --model directory is not reached)."""
    argv = ["generate", "--model", "/nonexistent/model", "--prompt", "x = ", option, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nestlm: error: ") and needle in err[0], err


def test_budget_targets_take_the_names_budgets_have() -> None:
    """`prune --budget 6b` as the README names budgets: 6e9 parameters (500m, 1.5k likewise)."""
    from nestlm.elastic.targets import Target

    assert nestlm.parse_target("6b") == nestlm.parse_target("6e9") == Target("params", 6e9)
    assert nestlm.parse_target("500M") == Target("params", 5e8)
    assert nestlm.parse_target("23b,active=2.8b") == Target("params", 23e9, 2.8e9)
    assert nestlm.parse_target("12GB").kind == "memory"  # a memory size is still one
    with pytest.raises(nestlm.NestlmError, match="6x"):
        nestlm.parse_target("6x")


def test_a_recipe_with_both_a_path_and_an_init_says_how_to_fix_it(capsys: pytest.CaptureFixture, tmp_path) -> None:
    parent = Path(nestlm.__file__).parent / "assets" / "parent"
    assert main(["train", "tiny", "--out", str(tmp_path / "r"), f"model.path={parent}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.init=null" in err[0]
    assert (
        main(["train", "tiny", "--out", str(tmp_path / "r"), f"model.path={parent}", "model.init=null", "--dry-run"])
        == 0
    )
    assert not (tmp_path / "r").exists()


def test_text_to_ids_with_the_models_tokenizer() -> None:
    parent = Path(nestlm.__file__).parent / "assets" / "parent"
    tok = nestlm.load_tokenizer(parent)
    ids = tok.encode("x = 1")
    assert tok.decode(ids) == "x = 1" and len(ids) == 5
