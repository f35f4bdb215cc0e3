"""Step-by-step arithmetic word problems with worked reasoning and a final answer line.

Format::

    Problem: Ada has 23 coins. Ada finds 15 more coins. Ada gives 7 coins to Ben. How many coins does Ada have now?
    Solution: 23 + 15 = 38. 38 - 7 = 31.
    Answer: 31

A problem has 1-3 operations (add / subtract, results stay in 0..199), so a small LM can learn the
digit-level arithmetic and the "carry the running total" chain. The evaluation prompt ends with
``"Solution:"``; the model must write the reasoning and the answer line.

Splits share no inputs: the split of a problem is the SHA-256 bucket of its number tuple.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from attnlab.datasets.icl import Split, split_of

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivan", "Jo", "Kim", "Lea", "Max", "Nia")
ITEMS = ("coins", "apples", "books", "cards", "shells", "stamps", "marbles", "pens", "tickets", "stones")
_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class ArithProblem:
    """``prompt`` ends with ``"Solution:"``; ``solution`` is the full continuation incl. the answer line."""

    prompt: str
    solution: str
    answer: int
    numbers: tuple[int, ...]


def _draw(rng: random.Random) -> tuple[int, list[tuple[str, int]]]:
    start = rng.randint(2, 60)
    ops: list[tuple[str, int]] = []
    total = start
    for _ in range(rng.randint(1, 3)):
        if total > 5 and rng.random() < 0.5:
            k = rng.randint(1, total - 1)
            ops.append(("-", k))
            total -= k
        else:
            k = rng.randint(1, min(60, 199 - total))
            ops.append(("+", k))
            total += k
    return start, ops


def make_problem(rng: random.Random, split: Split = "train") -> ArithProblem:
    """One problem whose number tuple falls in ``split``."""
    while True:
        start, ops = _draw(rng)
        numbers = (start, *[k if op == "+" else -k for op, k in ops])
        if split_of("arith:" + ",".join(map(str, numbers))) == split:
            break
    a, b = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    story = [f"{a} has {start} {item}."]
    steps = []
    total = start
    for op, k in ops:
        if op == "+":
            story.append(
                rng.choice([f"{a} finds {k} more {item}.", f"{b} gives {a} {k} {item}.", f"{a} buys {k} {item}."])
            )
            steps.append(f"{total} + {k} = {total + k}.")
            total += k
        else:
            story.append(
                rng.choice([f"{a} gives {k} {item} to {b}.", f"{a} loses {k} {item}.", f"{a} sells {k} {item}."])
            )
            steps.append(f"{total} - {k} = {total - k}.")
            total -= k
    story.append(f"How many {item} does {a} have now?")
    prompt = "Problem: " + " ".join(story) + "\nSolution:"
    solution = " " + " ".join(steps) + f"\nAnswer: {total}"
    return ArithProblem(prompt, solution, total, numbers)


def arithmetic_document(rng: random.Random, split: Split = "train") -> str:
    """Training text: problem, worked solution and answer line."""
    p = make_problem(rng, split)
    return p.prompt + p.solution


def build_eval_problems(n: int, *, split: Split = "test", seed: int = 0) -> list[ArithProblem]:
    return list(iter_eval_problems(n, split=split, seed=seed))


def iter_eval_problems(n: int, *, split: Split = "test", seed: int = 0):
    """``build_eval_problems`` one problem at a time (same problems, same order)."""
    rng = random.Random(f"arith:{seed}")
    for _ in range(n):
        yield make_problem(rng, split)


def parse_answer(text: str) -> int | None:
    """The integer on the first ``Answer:`` line of a generated solution, or None."""
    m = _ANSWER_RE.search(text)
    return int(m.group(1)) if m else None
