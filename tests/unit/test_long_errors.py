"""benchmarks/long_errors.py: the first wrong byte of a solution is classed by what had to be produced there."""

from __future__ import annotations

from nestlm.tasks import reasoning
from tests.benchmarks import load_benchmark


def _mod():
    return load_benchmark("long_errors")


def test_a_wrong_name_a_wrong_value_and_a_right_answer_are_told_apart() -> None:
    m = _mod()
    p = next(p for p in reasoning.test_problems(20, "long", 1) if p.family == "arithmetic")
    cot = p.cot
    second = cot.index(". ") + 2  # the name of the second statement
    wrong_name = cot[:second] + ("b" if cot[second] != "b" else "c") + cot[second + 1 :]
    digit = next(i for i in range(second, len(cot)) if cot[i].isdigit())
    wrong_value = cot[:digit] + str((int(cot[digit]) + 1) % 10) + cot[digit + 1 :]
    op = min(i for i in (cot.find(f" {o} ", second) for o in "+-*") if i >= 0) + 1  # an operator after it
    assert m.kind_at(cot, second) == "name" and m.kind_at(cot, digit) == "value" and m.kind_at(cot, op) == "other"
    assert m.kind_at(cot, 3) == "name" and m.kind_at(cot, len(cot)) == "other"
    assert m.first_divergence(cot, wrong_name) == second and m.first_divergence(cot, cot[:10]) == 10
    counts = m.classify([p] * 3, [wrong_name, wrong_value, cot], [False, False, True])
    assert counts == {"arithmetic": {"problems": 3, "right": 1, "name": 1, "value": 1}}


def test_a_negative_number_is_a_value_and_a_minus_sign_between_operands_is_not() -> None:
    m = _mod()
    ref = "A: a = 3. b = a - 5 = 3 - 5 = -2."
    assert m.kind_at(ref, ref.index("-2")) == "value"
    assert m.kind_at(ref, ref.index("- 5")) == "other"
    assert m.kind_at(ref, ref.index("b =")) == "name"
