"""A checkpoint written by an earlier nestlm still loads and gives the same logits.

tests/data/elastic-v1 is a tiny elastic checkpoint (the ``tiny`` recipe shrunk, a few steps)
written by nestlm before the checkpoint owner was rewritten; elastic-v1-expected.safetensors holds
the logits that code computed from it.
"""

from __future__ import annotations

from pathlib import Path

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
