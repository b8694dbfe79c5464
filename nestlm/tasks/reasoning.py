"""Synthetic reasoning problems with checkable answers, generated on the fly (no downloads).

Two families, each with a worked chain of thought and a final ``Answer: N`` line:
  arithmetic   a chain of assignments, each from the previous values:
               ``a = 7. b = a + 5. c = b * 2. What is c?``
  tracking     variables changed by increments, swaps and copies:
               ``x = 3, y = 8. swap x and y. x += 4. What is x?``
``short`` problems (2-4 steps at difficulty 1, ~100-250 bytes) feed stage 1; ``long``
ones (8-13 steps at difficulty 1, plus distractor variables, a few times longer) feed
the long-context stage 2. ``difficulty`` (1..5) raises the number of steps and the
operand range.

Long solutions walk the question statement by statement: arithmetic restates each clause
(distractors too) before computing it, ``h = g * 2 = 8 * 2 = 16.``; tracking writes an
increment's sum, then the whole state in plain values, ``x -= 1: 6 - 1 = 5. u = 6, x = 5.``
(changed 2026-12-05: a small model that had to find "the next step" by position among the
distractors, or to apply the change inside the restated state of five variables, solved 6%
of them). Prompts, answers and the test split are unchanged by it.

A problem is a pure function of its integer seed (only ``random.Random`` seeded from
it, never global state). Train and test seeds come from disjoint ranges, and on top
of that every prompt text belongs to exactly one split by a hash of the text itself
(test seeds redraw until their prompt hashes into the test bucket, all other seeds
until it hashes out of it), so no training problem can ever equal a test problem.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import NestlmError

TRAIN_SEEDS = range(0, 10**8)
TEST_SEEDS = range(10**9, 10**9 + 10**6)
VARIANTS = ("short", "long")
DIFFICULTIES = range(1, 6)
TEST_BUCKETS = 8  # 1 in TEST_BUCKETS prompt texts belongs to the test split
# "Answer: 24", "answer = -3", "**Answer:** 1,024", "the answer is +7." -> the integer.
ANSWER = re.compile(r"answer\s*(?:is\s*)?[:=]?\s*[*_]*\s*([+-]?\d[\d,]*)", re.IGNORECASE)
_LETTERS = [chr(ord("a") + i) for i in range(26)]


class ReasoningError(NestlmError, ValueError):
    """A bad variant, difficulty or seed range."""


@dataclass(frozen=True)
class Problem:
    """One problem: ``prompt`` is what the model sees, ``cot`` the worked solution ending in
    the ``Answer: N`` line, ``answer`` the number as a string."""

    seed: int
    variant: str
    family: str
    prompt: str
    cot: str
    answer: str
    difficulty: int = 1

    @property
    def text(self) -> str:
        """Prompt + worked solution + answer line: one training document."""
        return self.prompt + self.cot


def _steps(rng: random.Random, variant: str, difficulty: int) -> int:
    if variant == "short":
        return rng.randint(2, 2 + difficulty + 1)
    return rng.randint(6 + 2 * difficulty, 10 + 3 * difficulty)


def _arithmetic(rng: random.Random, variant: str, difficulty: int) -> tuple[str, str, int]:
    names = list(_LETTERS)
    rng.shuffle(names)
    n = _steps(rng, variant, difficulty)
    n_distract = difficulty + 2 if variant == "long" else 0
    if n + 1 + n_distract > len(names):  # hard long problems: more names than letters
        names += [f"{c}{d}" for d in range(1, 10) for c in _LETTERS]
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
        # Long: the worked step restates the question's clause first, so the solution walks the
        # question clause by clause (the next clause is the one after the last restated one, found
        # by its text) instead of finding "the next step" by position among the distractors.
        clause = f"{v} = {src} {op} {k} = " if variant == "long" else f"{v} = "
        a.append(f"{clause}{x} {op} {k} = {val}.")
    target = names[n]
    for j in range(n_distract):  # distractors: unused constants between the steps
        d = names[n + 1 + j]
        pos = rng.randint(1, len(q) - 1)
        c = rng.randint(1, hi)
        q.insert(pos, f"{d} = {c}.")
        a.insert(pos, f"{d} = {c}.")  # restated too: the solution follows the question in order
    return " ".join(q) + f" What is {target}?", " ".join(a), vals[target]


def _tracking(rng: random.Random, variant: str, difficulty: int) -> tuple[str, str, int]:
    names = rng.sample(["x", "y", "z", "w", "u", "v", "p", "q"], 3 if variant == "short" else 5)
    vals = {v: rng.randint(0, 9 * difficulty) for v in names}
    init = ", ".join(f"{v} = {vals[v]}" for v in names)
    q, a = [f"{init}."], [f"{init}."]

    def state(work: dict[str, str]) -> str:
        # The worked step restates every variable, in a fixed order, so that the value a step
        # reads always sits in the state just before it (a small model copies it from a fixed
        # place instead of searching back for the last write of that variable).
        return ", ".join(f"{n} = {work.get(n, vals[n])}" for n in names) + "."

    for _ in range(_steps(rng, variant, difficulty)):
        kind = rng.choice(["inc", "dec", "swap", "copy"])
        if kind in ("inc", "dec"):
            v, k = rng.choice(names), rng.randint(1, 5 * difficulty)
            old = vals[v]
            vals[v] += k if kind == "inc" else -k
            sym = "+=" if kind == "inc" else "-="
            q.append(f"{v} {sym} {k}.")
            if variant == "long":  # the sum first, then a state of plain values (5 variables: no sums inside)
                a.append(f"{v} {sym} {k}: {old} {sym[0]} {k} = {vals[v]}. " + state({}))
            else:
                a.append(f"{v} {sym} {k}: " + state({v: f"{old} {sym[0]} {k} = {vals[v]}"}))
        elif kind == "swap":
            v, w = rng.sample(names, 2)
            vals[v], vals[w] = vals[w], vals[v]
            q.append(f"swap {v} and {w}.")
            a.append(f"swap {v} and {w}: " + state({}))
        else:
            v, w = rng.sample(names, 2)
            vals[v] = vals[w]
            q.append(f"{v} = {w}.")
            a.append(f"{v} = {w}: " + state({}))
    target = rng.choice(names)
    return " ".join(q) + f" What is {target}?", " ".join(a), vals[target]


def is_test_text(prompt: str) -> bool:
    """Whether a prompt text belongs to the test split (a fixed hash of the text)."""
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()[0] % TEST_BUCKETS == 0


def check(variant: str, difficulty: int) -> None:
    """Raise ReasoningError unless ``variant`` and ``difficulty`` are valid."""
    if variant not in VARIANTS:
        raise ReasoningError(f"reasoning variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty not in DIFFICULTIES:
        raise ReasoningError(
            f"reasoning difficulty {difficulty!r} must be an int within {DIFFICULTIES.start}..{DIFFICULTIES.stop - 1}"
        )


def parse_spec(spec: str) -> tuple[str, int, int]:
    """``"long:1:100"`` -> ("long", 1, 100): a held-out set as the benchmarks name it (VARIANT:DIFFICULTY:N)."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        raise ReasoningError(f"problem set {spec!r} must be VARIANT:DIFFICULTY:N, e.g. long:1:100")
    variant, d, n = parts[0], int(parts[1]), int(parts[2])
    check(variant, d)
    return variant, d, n


def make_problem(seed: int, variant: str = "short", difficulty: int = 1) -> Problem:
    """The problem of ``seed`` (deterministic: uses only ``random.Random`` seeded from its arguments).

    Seeds in TEST_SEEDS give prompts of the test bucket (see :func:`is_test_text`), all
    other seeds prompts outside it, so train and test texts can never coincide.
    """
    check(variant, difficulty)
    want_test = seed in TEST_SEEDS
    attempt = 0
    while True:
        key = f"{seed}:{variant}:{difficulty}" + (f":{attempt}" if attempt else "")
        rng = random.Random(key)
        family = rng.choice(["arithmetic", "tracking"])
        q, a, ans = (_arithmetic if family == "arithmetic" else _tracking)(rng, variant, difficulty)
        prompt = f"Q: {q}\n"
        if is_test_text(prompt) == want_test:
            return Problem(seed, variant, family, prompt, f"A: {a}\nAnswer: {ans}\n", str(ans), difficulty)
        attempt += 1


def _problems(seeds: range, n: int, variant: str, difficulty: int, start: int) -> list[Problem]:
    check(variant, difficulty)
    if n < 0 or start < 0 or start + n > len(seeds):
        raise ReasoningError(f"problems {start}..{start + n} are outside the {len(seeds)} seeds of this split")
    return [make_problem(seeds[start + i], variant, difficulty) for i in range(n)]


def train_problems(n: int, variant: str = "short", difficulty: int = 1, start: int = 0) -> list[Problem]:
    """``n`` training problems: seeds ``TRAIN_SEEDS[start : start + n]``."""
    return _problems(TRAIN_SEEDS, n, variant, difficulty, start)


def test_problems(n: int, variant: str = "short", difficulty: int = 1, start: int = 0) -> list[Problem]:
    """``n`` held-out problems: seeds ``TEST_SEEDS[start : start + n]`` (disjoint from TRAIN_SEEDS)."""
    return _problems(TEST_SEEDS, n, variant, difficulty, start)


test_problems.__test__ = False  # not a pytest test, whatever its name


def extract_answer(text: str) -> str | None:
    """The integer after the first ``Answer:`` in generated text (normalised: ``+007`` -> ``7``,
    ``1,024`` -> ``1024``), or None when there is none.

    The first one counts: a model that goes on to write another problem after its answer
    is judged by the answer it gave.
    """
    m = ANSWER.search(text)
    if m is None:
        return None
    digits = m.group(1).replace(",", "")
    try:
        return str(int(digits))
    except ValueError:
        return None


def score(problems: Sequence[Problem], generations: Sequence[str]) -> float:
    """Exact-match accuracy of the final answers (0.0 for no problems)."""
    if len(problems) != len(generations):
        raise ReasoningError(f"{len(problems)} problems but {len(generations)} generations")
    if not problems:
        return 0.0
    return sum(extract_answer(g) == p.answer for p, g in zip(problems, generations, strict=True)) / len(problems)
