"""Input generators: each makes a ``PromptSet`` (or task data) procedurally from a seed; nothing is downloaded.

``DATASETS`` maps the names ``attnlab scan --dataset NAME`` accepts to builders ``f(model, n_prompts, seed)``.
"""
from __future__ import annotations

from typing import Callable

from attnlab.datasets.base import PromptSet, fingerprint


def _prose(model, n_prompts: int, seed: int) -> PromptSet:
    import random

    from attnlab.datasets.prose import prose_paragraphs

    paras = [p for p in prose_paragraphs() if len(p) > 200]
    rng = random.Random(seed)
    picked = rng.sample(paras, min(n_prompts, len(paras)))
    return PromptSet(name=f"prose(n={len(picked)},seed={seed})", texts=picked, seed=seed)


def _repeated(model, n_prompts: int, seed: int) -> PromptSet:
    from attnlab.datasets.repeated import repeated_random_tokens

    return repeated_random_tokens(model, n_prompts=n_prompts, seed=seed)


def _niah(model, n_prompts: int, seed: int) -> PromptSet:
    from attnlab.datasets.niah_set import niah_dataset

    return niah_dataset(model, n_prompts, seed)


DATASETS: dict[str, Callable[..., PromptSet]] = {
    "prose": _prose,
    "repeated-random": _repeated,
    "niah": _niah,
}

__all__ = ["PromptSet", "fingerprint", "DATASETS"]
