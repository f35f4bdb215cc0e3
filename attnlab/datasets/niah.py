"""Needle-in-a-haystack (NIAH) trials that work with any Hugging Face tokenizer.

A trial is a prose haystack (stdlib docstrings, see ``attnlab.datasets.prose``) filled to a target
length *in tokens of the given tokenizer*, one or more needle sentences such as
``"The secret harbor code is 417."`` inserted at ``depth`` percent of the haystack, and a question::

    <haystack ... needle ... haystack>
    Question: What is the secret harbor code?
    Answer:

The model should continue with `` 417``. Following Wu et al. (retrieval heads), the needle goes to
``depth%`` of the haystack and is *moved back to the preceding sentence boundary*; unlike the
reference code (hard-coded Llama-2 period ids) the boundary is found in text space, so the needle
never lands mid-sentence whatever the tokenizer.

``needle_token_span`` locates the answer's tokens inside the prompt ids (first window whose token-set
overlap with the answer ids exceeds 0.9), as the retrieval-score spec requires.

``niah_document`` makes training documents (several needles, several answered questions) in the
same format, so the organism is trained on exactly the prompt format it is evaluated on.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from attnlab.datasets.prose import corpus_vocabulary, prose_sentences

QUESTION_TEMPLATE = "Question: What is the secret {key} code?\nAnswer:"
NEEDLE_TEMPLATE = "The secret {key} code is {code}."


@dataclass(frozen=True)
class NiahTrial:
    """One needle-in-a-haystack prompt and its ground truth.

    Attributes
    ----------
    prompt : str
        Full prompt text without special tokens (the tokenizer adds BOS if it does so).
    needle : str
        The needle sentence the question asks about.
    question : str
        The question block appended after the haystack (ends with ``"Answer:"``).
    answer : str
        The code the model must produce (digits only, e.g. ``"417"``); the model's continuation
        is ``" " + answer``.
    key : str
        The word naming the needle.
    target_length : int
        Requested prompt length in tokens (special tokens included).
    n_tokens : int
        Actual prompt length in tokens (special tokens included).
    depth : float
        Requested insertion depth in percent of the haystack (0 = start, 100 = end).
    needle_span : tuple[int, int]
        Character span ``[start, end)`` of ``needle`` inside ``prompt``.
    distractors : tuple[str, ...]
        Other needle sentences (different keys) inserted at random depths.
    """

    prompt: str
    needle: str
    question: str
    answer: str
    key: str
    target_length: int
    n_tokens: int
    depth: float
    needle_span: tuple[int, int]
    distractors: tuple[str, ...] = ()


@functools.lru_cache(maxsize=1)
def needle_keys() -> tuple[str, ...]:
    """Words usable as needle keys: corpus words of 4-8 letters."""
    return tuple(w for w in corpus_vocabulary() if 4 <= len(w) <= 8)


def make_needle(rng: random.Random, exclude: Sequence[str] = (), n_digits: int = 3) -> tuple[str, str, str, str]:
    """Draw ``(key, code, needle_sentence, question)`` with a key not in ``exclude``."""
    keys = needle_keys()
    excluded = set(exclude)
    key = rng.choice(keys)
    while key in excluded:
        key = rng.choice(keys)
    code = str(rng.randrange(10 ** (n_digits - 1), 10**n_digits))
    return key, code, NEEDLE_TEMPLATE.format(key=key, code=code), QUESTION_TEMPLATE.format(key=key)


def _n_tokens(tokenizer: Any, text: str, special: bool = False) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def _fill_sentences(tokenizer: Any, rng: random.Random, budget: int) -> list[str]:
    """Contiguous corpus sentences (random start, wrapping) totalling about ``budget`` tokens.

    Whole sentences are added while they fit; the next one is cut at a word boundary to use the
    remaining budget and closed with a period, so the haystack length is within a few tokens.
    """
    pool = prose_sentences()
    i = rng.randrange(len(pool))
    out: list[str] = []
    used = 0
    while used < budget:
        batch = [pool[(i + k) % len(pool)] for k in range(16)]
        i += 16
        counts = [len(ids) for ids in tokenizer([" " + s for s in batch], add_special_tokens=False)["input_ids"]]
        for sent, cnt in zip(batch, counts):
            if used + cnt <= budget:
                out.append(sent)
                used += cnt
                continue
            words = sent.rstrip(".!?").split(" ")
            lo, hi = 0, len(words)
            while lo < hi:  # largest word prefix whose tokens (plus a period) fit the budget
                mid = (lo + hi + 1) // 2
                if used + _n_tokens(tokenizer, " " + " ".join(words[:mid]) + ".") <= budget:
                    lo = mid
                else:
                    hi = mid - 1
            if lo > 0:
                out.append(" ".join(words[:lo]) + ".")
            return out
    return out


def insert_at_depths(sentences: list[str], inserts: list[tuple[float, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Join sentences with single spaces, inserting each ``(depth, needle)`` at a sentence boundary.

    The insertion point is ``depth%`` of the haystack's characters, moved back to the start of the
    sentence containing it (depth 100 = after the last sentence). Returns the text and the char span
    of each needle in input order.
    """
    starts, pos = [], 0
    for s in sentences:
        starts.append(pos)
        pos += len(s) + 1
    total = max(pos - 1, 0)
    slots: list[tuple[int, int]] = []  # (sentence index to insert before, insert order)
    for order, (depth, _) in enumerate(inserts):
        char = depth / 100.0 * total
        idx = len(sentences) if depth >= 100 else max([k for k, st in enumerate(starts) if st <= char] or [0])
        slots.append((idx, order))
    by_slot: dict[int, list[int]] = {}
    for idx, order in sorted(slots):
        by_slot.setdefault(idx, []).append(order)
    parts: list[str] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(inserts)
    cursor = 0
    for k in range(len(sentences) + 1):
        for order in by_slot.get(k, []):
            needle = inserts[order][1]
            spans[order] = (cursor, cursor + len(needle))
            parts.append(needle)
            cursor += len(needle) + 1
        if k < len(sentences):
            parts.append(sentences[k])
            cursor += len(sentences[k]) + 1
    return " ".join(parts), spans


def build_niah_trials(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    n_needles: int = 1,
    trials_per_cell: int = 1,
    seed: int = 0,
    n_digits: int = 3,
) -> list[NiahTrial]:
    """Grid of NIAH trials: every ``length`` x ``depth`` x ``trials_per_cell``.

    Parameters
    ----------
    tokenizer : Hugging Face tokenizer
        Any tokenizer callable as ``tokenizer(text, add_special_tokens=...)``; lengths are counted
        in its tokens, special tokens (BOS) included.
    lengths : sequence of int
        Target prompt lengths in tokens.
    depths : sequence of float
        Needle depths in percent (0-100).
    n_needles : int, default=1
        Needles per prompt; the question asks about the first, the others (different keys) are
        distractors at random depths.
    trials_per_cell : int, default=1
        Trials with different haystacks / keys / codes per grid cell.
    seed : int, default=0
        Seed of everything random (haystack start, keys, codes, distractor depths).
    n_digits : int, default=3
        Digits of the secret code.
    """
    return list(
        iter_niah_trials(
            tokenizer,
            lengths,
            depths,
            n_needles=n_needles,
            trials_per_cell=trials_per_cell,
            seed=seed,
            n_digits=n_digits,
        )
    )


def iter_niah_trials(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    n_needles: int = 1,
    trials_per_cell: int = 1,
    seed: int = 0,
    n_digits: int = 3,
) -> Iterator[NiahTrial]:
    """``build_niah_trials`` one trial at a time (the same trials, in the same order), so a large grid can be
    scored as it is made instead of held."""
    if n_needles < 1:
        raise ValueError(f"n_needles must be >= 1, got {n_needles}")
    for depth in depths:
        if not 0 <= depth <= 100:
            raise ValueError(f"depth must be in [0, 100], got {depth}")
    rng = random.Random(seed)
    for length in lengths:
        for depth in depths:
            for _ in range(trials_per_cell):
                yield _build_one(tokenizer, rng, int(length), float(depth), n_needles, n_digits)


def _build_one(
    tokenizer: Any, rng: random.Random, length: int, depth: float, n_needles: int, n_digits: int
) -> NiahTrial:
    needles: list[tuple[str, str, str, str]] = []
    for _ in range(n_needles):
        needles.append(make_needle(rng, [n[0] for n in needles], n_digits))
    key, code, needle, question = needles[0]
    suffix = "\n" + question
    fixed = _n_tokens(tokenizer, "", special=True) + _n_tokens(tokenizer, suffix)
    fixed += sum(_n_tokens(tokenizer, " " + n[2]) for n in needles)
    budget = length - fixed
    if budget < 1:
        raise ValueError(f"target length {length} too short for the needle and question ({fixed} tokens)")
    sentences = _fill_sentences(tokenizer, rng, budget)
    inserts = [(depth, needle)] + [(rng.uniform(0, 100), n[2]) for n in needles[1:]]
    haystack, spans = insert_at_depths(sentences, inserts)
    prompt = haystack + suffix
    return NiahTrial(
        prompt=prompt,
        needle=needle,
        question=question,
        answer=code,
        key=key,
        target_length=length,
        n_tokens=_n_tokens(tokenizer, prompt, special=True),
        depth=depth,
        needle_span=spans[0],
        distractors=tuple(n[2] for n in needles[1:]),
    )


def needle_token_span(
    prompt_ids: Sequence[int], answer_ids: Sequence[int], threshold: float = 0.9
) -> tuple[int, int] | None:
    """First window ``[s, s + len(answer_ids))`` of ``prompt_ids`` whose token-set overlap exceeds ``threshold``.

    Overlap is ``|set(window) & set(answer)| / |set(answer)|`` (Wu et al.). Tokenize the answer as it
    appears in context (``" " + answer`` for the needle format here). Returns None if no window
    qualifies.
    """
    n = len(answer_ids)
    if n == 0:
        raise ValueError("answer_ids is empty")
    target = set(int(t) for t in answer_ids)
    ids = [int(t) for t in prompt_ids]
    for s in range(len(ids) - n + 1):
        if len(set(ids[s : s + n]) & target) / len(target) > threshold:
            return (s, s + n)
    return None


def niah_document(
    rng: random.Random,
    n_sentences: int,
    *,
    n_needles: int = 1,
    n_questions: int = 1,
    exclude_keys: Sequence[str] = (),
    n_digits: int = 3,
) -> tuple[str, list[str]]:
    """Training document: haystack of ``n_sentences`` corpus sentences, needles, answered questions.

    The needles are inserted at uniform random depths (at sentence boundaries); ``n_questions`` of
    them (at most ``n_needles``) are asked in random order, each followed by ``" " + code``. The
    first question follows the haystack exactly as in ``build_niah_trials``. Returns the text and
    the keys used (so a packer can keep keys unique within a training window).
    """
    pool = prose_sentences()
    start = rng.randrange(len(pool))
    sentences = [pool[(start + k) % len(pool)] for k in range(max(n_sentences, 0))]
    needles: list[tuple[str, str, str, str]] = []
    for _ in range(n_needles):
        needles.append(make_needle(rng, list(exclude_keys) + [n[0] for n in needles], n_digits))
    haystack, _ = insert_at_depths(sentences, [(rng.uniform(0, 100), n[2]) for n in needles])
    asked = rng.sample(needles, min(n_questions, n_needles))
    qa = "\n".join(f"{q} {code}" for _, code, _, q in asked)
    return haystack + "\n" + qa, [n[0] for n in needles]
