"""Synthetic reasoning problems with checkable answers, generated on the fly (no downloads).

Two families, each with a worked chain of thought and a final ``Answer: N`` line:
  arithmetic   a chain of assignments, each from the previous values:
               ``a = 7. b = a + 5. c = b * 2. What is c?``
  tracking     variables changed by increments, swaps and copies:
               ``x = 3, y = 8. swap x and y. x += 4. What is x?``
``short`` problems (2-4 steps, ~100-250 bytes) feed stage 1; ``long`` ones (8-16
steps plus distractor variables) feed the long-context stage 2. A problem is a pure
function of its integer seed; train and test seeds come from disjoint ranges, so
evaluation never sees a training problem.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

TRAIN_SEEDS = range(0, 10**8)
TEST_SEEDS = range(10**9, 10**9 + 10**6)
VARIANTS = ("short", "long")
ANSWER = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` is what the model sees, ``cot`` the worked solution, ``answer`` the number."""

    seed: int
    variant: str
    family: str
    prompt: str
    cot: str
    answer: str

    @property
    def text(self) -> str:
        """Prompt + solution + answer line: one training document."""
        return self.prompt + self.cot


def _steps(rng: random.Random, variant: str, difficulty: int) -> int:
    if variant == "short":
        return rng.randint(2, 2 + difficulty + 1)
    return rng.randint(6 + 2 * difficulty, 10 + 3 * difficulty)


def _arithmetic(rng: random.Random, variant: str, difficulty: int) -> tuple[str, str, int]:
    names = [chr(ord("a") + i) for i in range(26)]
    rng.shuffle(names)
    n = _steps(rng, variant, difficulty)
    hi = 9 * difficulty + 1
    vals: dict[str, int] = {}
    q, a = [], []
    first = names[0]
    vals[first] = rng.randint(1, hi)
    q.append(f"{first} = {vals[first]}.")
    a.append(f"{first} = {vals[first]}.")
    for i in range(1, n + 1):
        v = names[i]
        src = rng.choice(list(vals)[-2:]) if variant == "long" else names[i - 1]
        x = vals[src]
        op = rng.choice(["+", "-", "*"] if abs(x) < 40 else ["+", "-"])
        k = rng.randint(2, 3) if op == "*" else rng.randint(1, hi)
        val = x + k if op == "+" else x - k if op == "-" else x * k
        vals[v] = val
        q.append(f"{v} = {src} {op} {k}.")
        a.append(f"{v} = {x} {op} {k} = {val}.")
    target = names[n]
    if variant == "long":  # distractors: unused variables between the steps
        for _ in range(difficulty + 2):
            d = names[n + 1 + _]
            pos = rng.randint(1, len(q) - 1)
            c = rng.randint(1, hi)
            q.insert(pos, f"{d} = {c}.")
    return " ".join(q) + f" What is {target}?", " ".join(a), vals[target]


def _tracking(rng: random.Random, variant: str, difficulty: int) -> tuple[str, str, int]:
    names = rng.sample(["x", "y", "z", "w", "u", "v", "p", "q"], 3 if variant == "short" else 5)
    vals = {v: rng.randint(0, 9 * difficulty) for v in names}
    init = ", ".join(f"{v} = {vals[v]}" for v in names)
    q, a = [f"{init}."], [f"{init}."]
    for _ in range(_steps(rng, variant, difficulty)):
        kind = rng.choice(["inc", "dec", "swap", "copy"])
        if kind in ("inc", "dec"):
            v, k = rng.choice(names), rng.randint(1, 5 * difficulty)
            vals[v] += k if kind == "inc" else -k
            sym = "+=" if kind == "inc" else "-="
            q.append(f"{v} {sym} {k}.")
            a.append(f"{v} {sym} {k}: {v} = {vals[v]}.")
        elif kind == "swap":
            v, w = rng.sample(names, 2)
            vals[v], vals[w] = vals[w], vals[v]
            q.append(f"swap {v} and {w}.")
            a.append(f"swap: {v} = {vals[v]}, {w} = {vals[w]}.")
        else:
            v, w = rng.sample(names, 2)
            vals[v] = vals[w]
            q.append(f"{v} = {w}.")
            a.append(f"{v} = {w}: {v} = {vals[v]}.")
    target = rng.choice(names)
    return " ".join(q) + f" What is {target}?", " ".join(a), vals[target]


def make_problem(seed: int, variant: str = "short", difficulty: int = 1) -> Problem:
    """The problem of ``seed`` (deterministic: uses only ``random.Random(seed)``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty {difficulty} must be within 1..5")
    rng = random.Random(f"{seed}:{variant}:{difficulty}")
    family = rng.choice(["arithmetic", "tracking"])
    q, a, ans = (_arithmetic if family == "arithmetic" else _tracking)(rng, variant, difficulty)
    return Problem(seed, variant, family, f"Q: {q}\n", f"A: {a}\nAnswer: {ans}\n", str(ans))


def _problems(seeds: range, n: int, variant: str, difficulty: int, start: int) -> list[Problem]:
    if start < 0 or start + n > len(seeds):
        raise ValueError(f"problems {start}..{start + n} are outside the {len(seeds)} seeds of this split")
    return [make_problem(seeds[start + i], variant, difficulty) for i in range(n)]


def train_problems(n: int, variant: str = "short", difficulty: int = 1, start: int = 0) -> list[Problem]:
    """``n`` training problems (seeds from TRAIN_SEEDS, starting at index ``start``)."""
    return _problems(TRAIN_SEEDS, n, variant, difficulty, start)


def test_problems(n: int, variant: str = "short", difficulty: int = 1, start: int = 0) -> list[Problem]:
    """``n`` held-out problems (seeds from TEST_SEEDS, disjoint from TRAIN_SEEDS)."""
    return _problems(TEST_SEEDS, n, variant, difficulty, start)


test_problems.__test__ = False  # not a pytest test, whatever its name


def extract_answer(text: str) -> str | None:
    """The number after the first ``Answer:`` in generated text, or None."""
    m = ANSWER.search(text)
    return m.group(1) if m else None


def score(problems: Sequence[Problem], generations: Sequence[str]) -> float:
    """Exact-match accuracy of the final answers."""
    if len(problems) != len(generations):
        raise ValueError(f"{len(problems)} problems but {len(generations)} generations")
    if not problems:
        return 0.0
    return sum(extract_answer(g) == p.answer for p, g in zip(problems, generations, strict=True)) / len(problems)
