"""solution_perplexity: each solution scored given its own question, independent of batching and padding."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nestlm
from nestlm.demo import PARENT_DIR
from nestlm.eval.perplexity import solution_perplexity
from nestlm.tasks import reasoning
from nestlm.tokenizer import ByteTokenizer


def test_solution_perplexity_equals_each_problem_alone() -> None:
    torch.manual_seed(0)
    model = nestlm.load(PARENT_DIR).eval()
    tok = ByteTokenizer()
    problems = reasoning.test_problems(5, "short", 1) + reasoning.test_problems(2, "long", 1)
    got = solution_perplexity(model, tok, problems, batch_size=3)
    total, count = 0.0, 0
    for p in problems:  # one unpadded row at a time; the targets are the solution tokens and EOS
        q, a = tok.encode(p.prompt), tok.encode(p.cot) + [tok.eos_token_id]
        ids = torch.tensor([q + a])
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits[0]
        total += float(F.cross_entropy(logits[len(q) - 1 :], ids[0, len(q) :], reduction="sum"))
        count += len(a)
    assert got["tokens"] == count
    assert abs(got["loss"] - total / count) < 1e-5
    # the questions are not targets: scoring every token gives a different number
    whole = [reasoning.Problem(0, "short", "x", "", p.text, "0") for p in problems]
    everything = solution_perplexity(model, tok, whole)
    assert abs(everything["loss"] - got["loss"]) > 1e-3
