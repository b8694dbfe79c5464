"""Synthetic reasoning: answers are right, generation is deterministic, train and test never overlap."""

from __future__ import annotations

import re

import pytest

from nestlm.eval import reasoning


def solve(prompt: str) -> int:
    """An independent solver: execute the problem's statements as Python."""
    body = prompt[3:].rsplit(" What is ", 1)
    stmts, target = body[0], body[1].rstrip("?\n")
    env: dict[str, int] = {}
    for s in re.split(r"(?<=\.)\s", stmts):
        s = s.strip().rstrip(".")
        if not s:
            continue
        m = re.fullmatch(r"swap (\w) and (\w)", s)
        if m:
            a, b = m.groups()
            env[a], env[b] = env[b], env[a]
            continue
        for part in s.split(", "):
            exec(part, {}, env)  # noqa: S102 - our own generated statements
    return env[target]


@pytest.mark.parametrize("variant", ["short", "long"])
def test_answers_are_correct(variant: str) -> None:
    for p in reasoning.train_problems(300, variant) + reasoning.test_problems(300, variant):
        assert str(solve(p.prompt)) == p.answer, p.text
        assert p.text.endswith(f"Answer: {p.answer}\n")


def test_deterministic_and_seed_dependent() -> None:
    assert reasoning.make_problem(7) == reasoning.make_problem(7)
    assert len({reasoning.make_problem(s).prompt for s in range(50)}) > 45


def test_long_is_longer() -> None:
    short = sum(len(p.text) for p in reasoning.train_problems(200, "short")) / 200
    long = sum(len(p.text) for p in reasoning.train_problems(200, "long")) / 200
    assert 80 < short < 260 and long > 2 * short


def test_train_and_test_are_disjoint() -> None:
    assert set(reasoning.TRAIN_SEEDS).isdisjoint(range(reasoning.TEST_SEEDS.start, reasoning.TEST_SEEDS.start + 10))
    assert reasoning.TRAIN_SEEDS.stop <= reasoning.TEST_SEEDS.start
    for v in ("short", "long"):
        train = {p.prompt for p in reasoning.train_problems(20000, v)}
        test = {p.prompt for p in reasoning.test_problems(1000, v)}
        assert train.isdisjoint(test)
        assert all(p.seed >= reasoning.TEST_SEEDS.start for p in reasoning.test_problems(10, v))


def test_extract_and_score() -> None:
    assert reasoning.extract_answer("A: x = 3.\nAnswer: -12\nQ: junk Answer: 5") == "-12"
    assert reasoning.extract_answer("no answer here") is None
    ps = reasoning.test_problems(2)
    assert reasoning.score(ps, [f"Answer: {ps[0].answer}", "Answer: nope"]) == 0.5
