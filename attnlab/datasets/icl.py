"""Procedural in-context-learning (ICL) tasks in the ``Q: x\\nA: y\\n\\n`` format.

Each task is a fixed function from an input string to an output string. A prompt shows ``k``
demonstrations (0-10) and ends with a query ``Q: x\\nA:``; the model answers `` y``. Since many tasks
share the input format, a 0-shot query is ambiguous (``"k q z"`` could ask for the first letter, the
upper case, the reverse ...): the demonstrations identify the task. That 0-shot / few-shot gap is
what function-vector and task-embedding methods close later.

Tasks (all computable from the input, so they generalise to unseen inputs):

* letter strings (``"k q z"``, 3-5 space-separated letters): ``uppercase``, ``first_letter``,
  ``last_letter``, ``next_letter`` (each letter shifted by one, z -> a), ``letter_count``,
  ``reverse_letters``;
* word lists from the corpus vocabulary: ``choose_first``, ``choose_last``, ``choose_middle`` (of
  3 comma-separated words), ``reverse_words`` (3 words), ``repeat_word`` (``"lamp"`` -> ``"lamp lamp"``);
* numbers 0-999: ``successor``, ``predecessor``, ``add_3``;
* ``corpus_next_word``: a word-to-word map built from the corpus, the word most often following the
  input in the stdlib prose (``"followed"`` -> ``"by"``), i.e. knowledge the LM absorbs from its
  prose, like antonyms in a real LM.

Splits: every *atomic input element* (a word, a number, a letter string) is assigned to train (70%),
valid (15%) or test (15%) by a SHA-256 bucket of the element (``prose.stable_bucket``), and composite
inputs are built from elements of one split. So splits share no inputs, and the assignment is the
same on every machine even though the corpus vocabulary depends on the Python version.
"""

from __future__ import annotations

import collections
import functools
import json
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from attnlab.datasets.prose import corpus_vocabulary, prose_paragraphs, stable_bucket
from attnlab.heads.io import write_text

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")
MAX_SHOTS = 10


def split_of(item: str) -> Split:
    """Split of one atomic input element: buckets 0-69 train, 70-84 valid, 85-99 test."""
    b = stable_bucket("icl:" + item)
    return "train" if b < 70 else "valid" if b < 85 else "test"


@functools.cache
def _words(split: Split) -> tuple[str, ...]:
    return tuple(w for w in corpus_vocabulary() if len(w) <= 7 and split_of(w) == split)


@functools.cache
def _numbers(split: Split) -> tuple[str, ...]:
    return tuple(str(n) for n in range(1, 1000) if split_of(str(n)) == split)


@functools.lru_cache(maxsize=1)
def corpus_next_word_map(min_count: int = 10, min_share: float = 0.45) -> dict[str, str]:
    """Word -> the word that most often follows it in the prose paragraphs (clear majority only)."""
    follow: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for para in prose_paragraphs():
        toks = para.split(" ")
        for a, b in zip(toks, toks[1:]):
            if re.fullmatch(r"[a-z]{3,10}", a) and re.fullmatch(r"[a-z]{2,10}", b):
                follow[a][b] += 1
    out: dict[str, str] = {}
    for a in sorted(follow):
        total = sum(follow[a].values())
        b, k = follow[a].most_common(1)[0]
        if total >= min_count and k / total >= min_share:
            out[a] = b
    return out


def _letters(rng: random.Random, split: Split) -> str:
    while True:
        s = " ".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 5)))
        if split_of(s) == split:
            return s


def _word_list(rng: random.Random, split: Split, n: int = 3, sep: str = ", ") -> str:
    return sep.join(rng.sample(_words(split), n))


def _shift(c: str) -> str:
    return chr((ord(c) - 97 + 1) % 26 + 97)


@dataclass(frozen=True)
class IclTask:
    """A named ICL task: ``sample(rng, split)`` draws an input, ``fn`` maps it to the output."""

    name: str
    sample: Callable[[random.Random, Split], str]
    fn: Callable[[str], str]


@functools.cache
def _next_word_pool(split: Split) -> tuple[str, ...]:
    return tuple(w for w in corpus_next_word_map() if split_of(w) == split)


def _next_word_input(rng: random.Random, split: Split) -> str:
    return rng.choice(_next_word_pool(split))


def warm_caches() -> None:
    """Build every cached pool now (e.g. before forking data workers, so they share it)."""
    for split in SPLITS:
        _words(split), _numbers(split), _next_word_pool(split)


TASKS: dict[str, IclTask] = {
    t.name: t
    for t in [
        IclTask("uppercase", _letters, lambda x: x.upper()),
        IclTask("first_letter", _letters, lambda x: x.split(" ")[0]),
        IclTask("last_letter", _letters, lambda x: x.split(" ")[-1]),
        IclTask("next_letter", _letters, lambda x: " ".join(_shift(c) for c in x.split(" "))),
        IclTask("letter_count", _letters, lambda x: str(len(x.split(" ")))),
        IclTask("reverse_letters", _letters, lambda x: " ".join(reversed(x.split(" ")))),
        IclTask("choose_first", lambda r, s: _word_list(r, s), lambda x: x.split(", ")[0]),
        IclTask("choose_last", lambda r, s: _word_list(r, s), lambda x: x.split(", ")[-1]),
        IclTask("choose_middle", lambda r, s: _word_list(r, s), lambda x: x.split(", ")[1]),
        IclTask("reverse_words", lambda r, s: _word_list(r, s, sep=" "), lambda x: " ".join(reversed(x.split(" ")))),
        IclTask("repeat_word", lambda r, s: r.choice(_words(s)), lambda x: f"{x} {x}"),
        IclTask("successor", lambda r, s: r.choice(_numbers(s)), lambda x: str(int(x) + 1)),
        IclTask("predecessor", lambda r, s: r.choice(_numbers(s)), lambda x: str(int(x) - 1)),
        IclTask("add_3", lambda r, s: r.choice(_numbers(s)), lambda x: str(int(x) + 3)),
        IclTask("corpus_next_word", _next_word_input, lambda x: corpus_next_word_map()[x]),
    ]
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def _check(task: str, split: str) -> IclTask:
    if task not in TASKS:
        raise ValueError(f"unknown ICL task {task!r}; known: {', '.join(TASK_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return TASKS[task]


def sample_pairs(
    task: str, split: Split, n: int, rng: random.Random, *, distinct: bool = True
) -> list[tuple[str, str]]:
    """``n`` (input, output) pairs of ``task`` from ``split`` (distinct inputs where the pool allows)."""
    t = _check(task, split)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        x = t.sample(rng, split)
        tries += 1
        if distinct and x in seen and tries < 50 * n:
            continue
        seen.add(x)
        out.append((x, t.fn(x)))
    return out


def format_prompt(demos: list[tuple[str, str]], query: str) -> str:
    """``Q: x\\nA: y\\n\\n`` for each demonstration, then ``Q: query\\nA:``."""
    return "".join(f"Q: {x}\nA: {y}\n\n" for x, y in demos) + f"Q: {query}\nA:"


@dataclass(frozen=True)
class IclPrompt:
    """A k-shot prompt; the expected continuation is ``" " + answer``."""

    task: str
    prompt: str
    answer: str
    n_shots: int
    split: Split


def make_prompt(task: str, split: Split, n_shots: int, rng: random.Random) -> IclPrompt:
    """One prompt with ``n_shots`` demonstrations and a query, all inputs from ``split``, distinct."""
    if not 0 <= n_shots <= MAX_SHOTS:
        raise ValueError(f"n_shots must be in [0, {MAX_SHOTS}], got {n_shots}")
    pairs = sample_pairs(task, split, n_shots + 1, rng)
    (qx, qy), demos = pairs[-1], pairs[:-1]
    return IclPrompt(task, format_prompt(demos, qx), qy, n_shots, split)


def build_eval_prompts(
    task: str, n_shots: int, n: int, *, split: Split = "test", seed: int = 0, start: int = 0
) -> list[IclPrompt]:
    """``n`` evaluation prompts (numbers ``start`` to ``start + n - 1``: each is made from its own number, so a
    long list can be made in pieces); the same seed gives the same queries for every ``n_shots``."""
    out = []
    for i in range(start, start + n):
        rng = random.Random(f"{seed}:{task}:{i}")
        query_rng = random.Random(f"{seed}:{task}:{i}:query")
        qx = TASKS[task].sample(query_rng, split)
        demos: list[tuple[str, str]] = []
        for x, y in sample_pairs(task, split, n_shots + 4, rng):
            if x != qx and len(demos) < n_shots:
                demos.append((x, y))
        out.append(IclPrompt(task, format_prompt(demos, qx), TASKS[task].fn(qx), n_shots, split))
    return out


def icl_document(rng: random.Random, *, split: Split = "train", max_shots: int = MAX_SHOTS) -> str:
    """Training text: a random task, 0..max_shots demonstrations and the answered query."""
    task = rng.choice(TASK_NAMES)
    p = make_prompt(task, split, rng.randint(0, max_shots), rng)
    return f"{p.prompt} {p.answer}"


def export_function_vectors(
    task: str, split: Split, n: int | None = None, *, seed: int = 0, path: str | None = None
) -> list[dict[str, str]]:
    """Task split in the function-vectors JSON format ``[{"input": x, "output": y}, ...]``.

    With ``n=None`` the whole input pool of the split is exported for finite pools (words, numbers,
    next-word map) and 500 samples for letter strings. Written to ``path`` (atomically) if given.
    """
    t = _check(task, split)
    rng = random.Random(f"fv:{seed}:{task}:{split}")
    if n is None:
        n = 500
        if t.sample is not _letters:
            pool = sorted({t.sample(random.Random(i), split) for i in range(4000)})
            n = min(n, len(pool))
    rows = [{"input": x, "output": y} for x, y in sample_pairs(task, split, n, rng)]
    if path is not None:
        write_text(path, json.dumps(rows, indent=1))
    return rows
