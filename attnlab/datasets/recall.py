"""Associative recall: a list of ``key: value`` pairs, then a query for one key.

Format (one prompt)::

    Pairs:
    lamp: 417
    river: 902
    ...
    Query: river
    Value: 902

It exercises the same find-the-key-then-copy mechanism as needle retrieval, with no prose in between,
which speeds up the formation of retrieval / induction heads in small models. Keys are corpus words
(distinct within a prompt), values 3-digit codes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from attnlab.datasets.niah import needle_keys


@dataclass(frozen=True)
class RecallPrompt:
    """One recall prompt: ``prompt`` ends with ``"Value:"``; the answer is ``" " + answer``."""

    prompt: str
    answer: str
    query_key: str
    n_pairs: int
    query_index: int


def make_recall(rng: random.Random, n_pairs: int, *, n_digits: int = 3) -> RecallPrompt:
    """A recall prompt with ``n_pairs`` distinct keys; the queried pair is uniform over positions."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    keys = rng.sample(needle_keys(), n_pairs)
    values = [str(rng.randrange(10 ** (n_digits - 1), 10**n_digits)) for _ in keys]
    q = rng.randrange(n_pairs)
    lines = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
    prompt = f"Pairs:\n{lines}\nQuery: {keys[q]}\nValue:"
    return RecallPrompt(prompt=prompt, answer=values[q], query_key=keys[q], n_pairs=n_pairs, query_index=q)


def recall_document(rng: random.Random, n_pairs: int) -> str:
    """Training text: a recall prompt followed by its answer."""
    p = make_recall(rng, n_pairs)
    return f"{p.prompt} {p.answer}"


def build_recall_prompts(n: int, *, n_pairs: tuple[int, int] = (4, 24), seed: int = 0) -> list[RecallPrompt]:
    """``n`` evaluation prompts with pair counts uniform in ``[n_pairs[0], n_pairs[1]]``."""
    return list(iter_recall_prompts(n, n_pairs=n_pairs, seed=seed))


def iter_recall_prompts(n: int, *, n_pairs: tuple[int, int] = (4, 24), seed: int = 0):
    """``build_recall_prompts`` one prompt at a time (same prompts, same order)."""
    rng = random.Random(seed)
    for _ in range(n):
        yield make_recall(rng, rng.randint(*n_pairs))
