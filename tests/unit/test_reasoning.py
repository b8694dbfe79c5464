"""Synthetic reasoning: answers are right, generation is deterministic, train and test never overlap."""

from __future__ import annotations

import random
import re

import pytest

from nestlm.errors import NestlmError
from nestlm.eval import reasoning

STEP = re.compile(r"^(\w+) = (\w+) ([-+*]) (\d+)$")


def solve(prompt: str) -> int:
    """An independent solver: run the problem's statements as Python, with no builtins."""
    assert prompt.startswith("Q: ") and prompt.endswith("?\n"), prompt
    stmts, target = prompt[3:-2].rsplit(" What is ", 1)
    env: dict[str, int] = {}
    for s in re.split(r"(?<=\.)\s", stmts):
        s = s.strip().rstrip(".")
        m = re.fullmatch(r"swap (\w+) and (\w+)", s)
        if m:
            a, b = m.groups()
            env[a], env[b] = env[b], env[a]
            continue
        for part in s.split(", "):
            assert re.fullmatch(r"\w+ ([-+]?=) (\w+)( [-+*] \d+)?", part), part  # only simple statements
            exec(part, {"__builtins__": {}}, env)  # noqa: S102 - checked to be a plain assignment
    return env[target]


def cot_is_consistent(p: reasoning.Problem) -> bool:
    """Every worked step 'v = x op k = val.' of an arithmetic solution is right arithmetic."""
    body = p.cot.split("\n")[0][3:]
    for step in body.split(". "):
        parts = step.rstrip(".").split(" = ")
        if len(parts) == 4:  # long: v = src op k = x op k = val (the clause restated first)
            if parts[1].split(" ")[1:] != parts[2].split(" ")[1:]:
                return False
            parts = [parts[0], *parts[2:]]
        if len(parts) == 3:  # v = x op k = val
            x, op, k = parts[1].split(" ")
            val = {"+": int(x) + int(k), "-": int(x) - int(k), "*": int(x) * int(k)}[op]
            if val != int(parts[2]):
                return False
    return True


@pytest.mark.parametrize("variant", ["short", "long"])
@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_answers_are_correct(variant: str, difficulty: int) -> None:
    ps = reasoning.train_problems(120, variant, difficulty) + reasoning.test_problems(60, variant, difficulty)
    assert {p.family for p in ps} == {"arithmetic", "tracking"}
    for p in ps:
        assert str(solve(p.prompt)) == p.answer, p.text
        assert p.text == p.prompt + p.cot
        assert p.cot.startswith("A: ") and p.text.endswith(f"\nAnswer: {p.answer}\n")
        assert reasoning.extract_answer(p.cot) == p.answer
        assert p.family != "arithmetic" or cot_is_consistent(p), p.text
        assert (p.variant, p.difficulty) == (variant, difficulty)


@pytest.mark.parametrize("difficulty", [1, 3])
def test_long_solutions_walk_the_question_in_order(difficulty: int) -> None:
    """Long arithmetic restates every clause of the question in order (distractors included); long
    tracking restates, after every statement, the state an independent replay of the question has."""
    for p in reasoning.test_problems(60, "long", difficulty):
        stmts = [s.rstrip(".") for s in re.split(r"(?<=\.)\s", p.prompt[3:].rsplit(" What is ", 1)[0])]
        body = p.cot.split("\n")[0][3:]
        if p.family == "arithmetic":
            restated = [" = ".join(c.rstrip(".").split(" = ")[:2]) for c in body.split(". ")]
            assert restated == stmts, p.text
            assert cot_is_consistent(p), p.text
            continue
        env: dict[str, int] = {}
        states = re.findall(r"((?:\w+ = -?\d+, )+\w+ = -?\d+)\.", body)
        assert len(states) == len(stmts), p.text  # the initial state, then one per statement
        for stmt, state in zip(stmts, states, strict=True):
            m = re.fullmatch(r"swap (\w+) and (\w+)", stmt)
            if m:
                env[m[1]], env[m[2]] = env[m[2]], env[m[1]]
            else:
                for part in stmt.split(", "):
                    exec(part, {"__builtins__": {}}, env)  # noqa: S102 - the plain statements of solve()
            assert state == ", ".join(f"{n} = {env[n]}" for n in re.findall(r"(\w+) = ", state)), p.text


def test_cot_check_catches_a_wrong_step() -> None:
    p = next(p for p in reasoning.train_problems(50) if p.family == "arithmetic")
    m = re.search(r"= (-?\d+)\.\n", p.cot)
    bad = p.cot[: m.start(1)] + str(int(m.group(1)) + 1) + p.cot[m.end(1) :]
    assert not cot_is_consistent(reasoning.Problem(p.seed, p.variant, p.family, p.prompt, bad, p.answer))


def test_deterministic_seed_dependent_no_global_state() -> None:
    random.seed(123)
    before = random.getstate()
    assert reasoning.make_problem(7) == reasoning.make_problem(7)
    assert reasoning.make_problem(7, "long", 2) == reasoning.make_problem(7, "long", 2)
    assert reasoning.train_problems(5, start=3) == [reasoning.make_problem(s) for s in range(3, 8)]
    assert random.getstate() == before  # global random state untouched
    assert len({reasoning.make_problem(s).prompt for s in range(200)}) > 195
    assert reasoning.make_problem(7, "short") != reasoning.make_problem(7, "long")
    assert reasoning.make_problem(7, "short", 1).prompt != reasoning.make_problem(7, "short", 4).prompt


def test_lengths_and_difficulty() -> None:
    def mean_len(variant: str, difficulty: int = 1) -> float:
        return sum(len(p.text.encode()) for p in reasoning.train_problems(300, variant, difficulty)) / 300

    short = [len(p.text.encode()) for p in reasoning.train_problems(300, "short")]
    assert 100 <= sum(short) / len(short) <= 250 and max(short) <= 320  # whole problems fit a 320-byte row
    assert mean_len("long") > 2 * mean_len("short")
    assert mean_len("short", 4) > mean_len("short", 1) and mean_len("long", 4) > mean_len("long", 1)
    steps = sum(p.prompt.count(".") for p in reasoning.train_problems(200, "long", 1)) / 200
    assert steps > 2 * sum(p.prompt.count(".") for p in reasoning.train_problems(200, "short", 1)) / 200


def test_train_and_test_are_disjoint() -> None:
    assert reasoning.TRAIN_SEEDS.stop <= reasoning.TEST_SEEDS.start
    assert all(p.seed in reasoning.TEST_SEEDS for p in reasoning.test_problems(10, start=500))
    for v in ("short", "long"):
        train = reasoning.train_problems(3000, v)
        test = reasoning.test_problems(1500, v)
        assert {p.text for p in train}.isdisjoint({p.text for p in test})
        assert {p.prompt for p in train}.isdisjoint({p.prompt for p in test})
        # by construction: each prompt text belongs to exactly one split
        assert all(reasoning.is_test_text(p.prompt) for p in test)
        assert not any(reasoning.is_test_text(p.prompt) for p in train)


def test_extract_answer_handles_noise() -> None:
    ex = reasoning.extract_answer
    assert ex("A: x = 3.\nAnswer: -12\nQ: junk Answer: 5") == "-12"  # the first answer counts
    assert ex("Answer: 24.") == "24"
    assert ex("some work...\n**Answer:** 1,024\n") == "1024"
    assert ex("so the answer is +007") == "7"
    assert ex("answer = -0") == "0"
    assert ex("ANSWER:42<eos>garbage") == "42"
    assert ex("no answer here") is None
    assert ex("Answer: x") is None
    assert ex("") is None


def test_score() -> None:
    ps = reasoning.test_problems(4)
    gens = [p.cot for p in ps[:2]] + [f"Answer: {int(ps[2].answer) + 1}", "I do not know"]
    assert reasoning.score(ps, gens) == 0.5
    assert reasoning.score(ps, [f"  Answer: {int(p.answer):,}\n" for p in ps]) == 1.0
    assert reasoning.score([], []) == 0.0
    with pytest.raises(ValueError, match="4 problems but 3 generations"):
        reasoning.score(ps, gens[:3])


def test_bad_arguments() -> None:
    with pytest.raises(NestlmError, match="variant 'medium' is not one of short, long"):
        reasoning.make_problem(1, "medium")
    with pytest.raises(ValueError, match=r"difficulty 9 must be an int within 1\.\.5"):
        reasoning.train_problems(3, "short", 9)
    with pytest.raises(NestlmError, match="outside the 1000000 seeds"):
        reasoning.test_problems(10, start=len(reasoning.TEST_SEEDS) - 5)


def test_a_problem_set_spec_is_parsed_or_refused_in_one_line() -> None:
    assert reasoning.parse_spec("long:3:200") == ("long", 3, 200)
    for bad in ("long:1", "long:x:10", "medium:1:10", "short:9:10"):
        with pytest.raises(NestlmError, match=r"VARIANT:DIFFICULTY:N|not one of|within"):
            reasoning.parse_spec(bad)
