"""Templated text classification with label words, in a few-shot prompt format.

Two tasks:

* ``sentiment`` (labels ``positive`` / ``negative``): ``"the soup was wonderful and the staff were kind"``;
* ``topic`` (labels ``sports`` / ``food`` / ``weather`` / ``music``): ``"the striker scored in the final"``.

Prompt format (``k`` demonstrations, then the query)::

    Text: the soup was wonderful and the room was clean
    Label: positive

    Text: the storm flooded the valley overnight
    Label:

The model's answer is the label word; accuracy is measured by comparing the next-token log-probs of
the label words' first tokens (the calibration interventions - contextual calibration, etc. - act on
exactly these probabilities). Splits share no inputs: a text is assigned to a split by the SHA-256
bucket of the text itself.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from attnlab.datasets.icl import Split, split_of

ClsTask = Literal["sentiment", "topic"]

LABELS: dict[str, tuple[str, ...]] = {
    "sentiment": ("positive", "negative"),
    "topic": ("sports", "food", "weather", "music"),
}

_SENT_NOUNS = (
    "soup",
    "room",
    "staff",
    "film",
    "book",
    "service",
    "trip",
    "game",
    "music",
    "meal",
    "hotel",
    "show",
    "car",
    "phone",
    "class",
)
_SENT_ADJ = {
    "positive": (
        "wonderful",
        "great",
        "lovely",
        "excellent",
        "kind",
        "clean",
        "delightful",
        "superb",
        "pleasant",
        "fun",
        "bright",
        "warm",
    ),
    "negative": (
        "awful",
        "terrible",
        "dirty",
        "rude",
        "boring",
        "bad",
        "dull",
        "broken",
        "poor",
        "cold",
        "slow",
        "noisy",
    ),
}
_TOPIC_PARTS = {
    "sports": (
        ("the striker", "the team", "the coach", "the runner", "the keeper", "the captain"),
        ("scored twice in", "won", "lost", "trained hard for", "was injured before", "celebrated"),
        ("the final", "the match", "the race", "the league game", "the tournament", "the derby"),
    ),
    "food": (
        ("the chef", "the baker", "the cook", "my aunt", "the waiter", "the kitchen"),
        ("baked", "served", "burned", "seasoned", "tasted", "prepared"),
        ("the bread", "a spicy stew", "the cake", "fresh pasta", "the soup", "a salad"),
    ),
    "weather": (
        ("the storm", "heavy rain", "the wind", "a cold front", "the fog", "the heat"),
        ("flooded", "covered", "hit", "swept across", "lingered over", "cooled"),
        ("the valley", "the coast", "the city", "the hills", "the harbor", "the plains"),
    ),
    "music": (
        ("the band", "the singer", "the pianist", "the choir", "the drummer", "the orchestra"),
        ("played", "recorded", "rehearsed", "performed", "released", "sang"),
        ("a new album", "the symphony", "a slow ballad", "the encore", "a jazz set", "the anthem"),
    ),
}
_TOPIC_TAILS = ("", " last night", " on sunday", " again", " this week", " at dawn")


@dataclass(frozen=True)
class ClsExample:
    text: str
    label: str


def _sentence(rng: random.Random, task: str, label: str) -> str:
    if task == "sentiment":
        a, b = rng.sample(_SENT_NOUNS, 2)
        x, y = rng.sample(_SENT_ADJ[label], 2)
        verb = lambda n: "were" if n == "staff" else "was"  # noqa: E731
        return f"the {a} {verb(a)} {x} and the {b} {verb(b)} {y}"
    subj, verb, obj = (rng.choice(p) for p in _TOPIC_PARTS[label])
    return f"{subj} {verb} {obj}{rng.choice(_TOPIC_TAILS)}"


def make_example(task: ClsTask, split: Split, rng: random.Random, label: str | None = None) -> ClsExample:
    """One labelled text of ``split``; the label is uniform unless given."""
    if task not in LABELS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(LABELS)}")
    label = label if label is not None else rng.choice(LABELS[task])
    while True:
        text = _sentence(rng, task, label)
        if split_of("cls:" + text) == split:
            return ClsExample(text, label)


def format_prompt(demos: list[ClsExample], query: str) -> str:
    return "".join(f"Text: {d.text}\nLabel: {d.label}\n\n" for d in demos) + f"Text: {query}\nLabel:"


@dataclass(frozen=True)
class ClsPrompt:
    task: str
    prompt: str
    label: str
    labels: tuple[str, ...]
    n_shots: int


def make_prompt(task: ClsTask, split: Split, n_shots: int, rng: random.Random) -> ClsPrompt:
    demos = [make_example(task, split, rng) for _ in range(n_shots)]
    q = make_example(task, split, rng)
    return ClsPrompt(task, format_prompt(demos, q.text), q.label, LABELS[task], n_shots)


def classification_document(rng: random.Random, split: Split = "train", max_shots: int = 8) -> str:
    """Training text: a few-shot prompt of a random task with the answer."""
    task = rng.choice(tuple(LABELS))
    p = make_prompt(task, split, rng.randint(0, max_shots), rng)  # type: ignore[arg-type]
    return f"{p.prompt} {p.label}"


def build_eval_prompts(
    task: ClsTask, n_shots: int, n: int, *, split: Split = "test", seed: int = 0, start: int = 0
) -> list[ClsPrompt]:
    """``n`` evaluation prompts, numbers ``start`` to ``start + n - 1`` (each made from its own number)."""
    return [
        make_prompt(task, split, n_shots, random.Random(f"cls:{seed}:{task}:{n_shots}:{i}"))
        for i in range(start, start + n)
    ]
