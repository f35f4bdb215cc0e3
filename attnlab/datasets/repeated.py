"""Repeated random-token sequences: BOS + r random tokens + the same r tokens again (the standard probe for
induction heads: on the second copy an induction head attends to the token after the earlier occurrence)."""

from __future__ import annotations

import numpy as np

from attnlab.datasets.base import PromptSet


def repeated_random_tokens(
    model, *, n_prompts: int = 8, length: int = 50, n_repeats: int = 2, seed: int = 0
) -> PromptSet:
    """``n_prompts`` sequences of ``length`` random ordinary (non-special) token ids repeated ``n_repeats`` times.

    A BOS/CLS token is put first when the model's BOS policy adds one.
    """
    tok = model.tokenizer
    special = set(tok.all_special_ids)
    vocab = np.array([i for i in range(len(tok)) if i not in special])
    rng = np.random.default_rng(seed)
    prefix = []
    if model.bos_policy in ("tokenizer", "prepend"):
        first = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
        if first is not None:
            prefix = [int(first)]
    seqs = []
    for _ in range(n_prompts):
        block = rng.choice(vocab, size=length, replace=False if len(vocab) >= length else True).tolist()
        seqs.append(prefix + block * n_repeats)
    return PromptSet(
        name=f"repeated-random(n={n_prompts},len={length},x{n_repeats},seed={seed})", token_ids=seqs, seed=seed
    )
