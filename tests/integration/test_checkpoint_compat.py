"""A checkpoint written by an earlier nestlm still loads and gives the same logits.

tests/data/elastic-v1 is a tiny elastic checkpoint (the ``tiny`` recipe shrunk, a few steps)
written by nestlm before the checkpoint owner was rewritten; elastic-v1-expected.safetensors holds
the logits that code computed from it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nestlm

DATA = Path(__file__).resolve().parent.parent / "data" / "elastic-v1"


def test_old_elastic_checkpoint_gives_the_same_logits(one_thread):
    expected = load_file(str(DATA.parent / "elastic-v1-expected.safetensors"))
    model = nestlm.load(DATA).eval()
    assert model.budgets == ["full", "75", "50"]
    assert [model.num_parameters(budget=b) for b in model.budgets] == [39576, 30280, 19724]
    ids = expected["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected["logits.parent"], atol=1e-5, rtol=1e-5)
        for b in model.budgets:
            torch.testing.assert_close(model(ids, budget=b).logits, expected[f"logits.{b}"], atol=1e-5, rtol=1e-5)
            small = model.slice(b)
            assert small.num_parameters() == model.num_parameters(budget=b)
            torch.testing.assert_close(small(ids).logits, expected[f"logits.slice.{b}"], atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids, max_new_tokens=8, budget="50"), expected["generate.50"])


def test_old_elastic_checkpoint_records_are_typed():
    from nestlm.checkpoint import read_budgets, read_routers

    model = nestlm.load(DATA)
    b = model.budget("50")
    assert isinstance(b, nestlm.Budget) and b.name == "50" and b.target == "0.5"
    assert b.params == b.arch.num_parameters(model.config) == 19724
    assert b.fraction == b.params / model.num_parameters()
    assert read_budgets(DATA) == model.elastic
    routers = read_routers(DATA)
    assert routers is not None and set(k.split(".")[0] for k in routers) == {"routers"}
    assert model.importance is not None and model.importance.reordered


def test_an_unknown_budget_is_a_typed_error():
    model = nestlm.load(DATA)
    with pytest.raises(nestlm.UnknownBudgetError, match="unknown budget '7b'; known budgets: full, 75, 50") as e:
        model(torch.tensor([[3, 4]]), budget="7b")
    assert isinstance(e.value, KeyError) and isinstance(e.value, nestlm.NestlmError)
    assert str(e.value) == "unknown budget '7b'; known budgets: full, 75, 50"  # no KeyError quotes
    for call in (lambda: model.slice("7b"), lambda: model.num_parameters(budget="7b"), lambda: model.budget("7b")):
        with pytest.raises(nestlm.UnknownBudgetError):
            call()
