"""NIAH trials as a ``PromptSet`` for the retrieval-head probe: prompt + reference answer ids, with ground truth.

Each prompt's token ids are the NIAH prompt (under the model's BOS policy) followed by the reference answer's
ids (``" " + code``), so a single teacher-forced forward pass covers the answer. Per-prompt ``meta`` carries what
the retrieval probe needs:

- ``prompt_len``: number of prompt tokens (the answer starts there);
- ``answer_ids`` / ``answer``: the reference answer's ids and text;
- ``needle_span``: ``[n_s, n_e)`` token span of the answer inside the prompt (``needle_token_span``: first window
  whose token-set overlap with the answer ids exceeds 0.9; None when the tokenizer splits it differently);
- ``length``, ``depth``, ``key``: the grid cell.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from attnlab.datasets.base import PromptSet
from attnlab.datasets.niah import build_niah_trials, insert_at_depths, needle_token_span
from attnlab.errors import AttnlabError


def niah_prompt_set(
    model,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials_per_cell: int = 1,
    n_needles: int = 1,
    seed: int = 0,
    n_digits: int = 3,
) -> PromptSet:
    """Grid of ``lengths x depths x trials_per_cell`` NIAH trials with answers appended (see module docstring)."""
    tok = model.tokenizer
    trials = build_niah_trials(
        tok, lengths, depths, n_needles=n_needles, trials_per_cell=trials_per_cell, seed=seed, n_digits=n_digits
    )
    ids, meta = [], []
    for i, t in enumerate(trials):
        prompt_ids = model.token_ids(t.prompt, index=i)
        answer_ids = list(tok(" " + t.answer, add_special_tokens=False)["input_ids"])
        span = needle_token_span(prompt_ids, answer_ids)
        ids.append(prompt_ids + answer_ids)
        meta.append(
            {
                "prompt_len": len(prompt_ids),
                "answer_ids": answer_ids,
                "answer": t.answer,
                "needle_span": list(span) if span is not None else None,
                "length": t.target_length,
                "depth": t.depth,
                "key": t.key,
            }
        )
    name = (
        f"niah(lengths={list(lengths)},depths={[round(d, 1) for d in depths]},"
        f"x{trials_per_cell},needles={n_needles},seed={seed})"
    )
    return PromptSet(name=name, token_ids=ids, meta=meta, seed=seed)


# ---- a user's own needles ---------------------------------------------------------------------------------------

NEEDLE_FIELDS = ("haystack", "needle", "question")
USER_QUESTION = "\nBased on the content of the book, Question: {question}\nAnswer:"  # Retrieval_Head's question


def _sentences(text: str) -> list[str]:
    """Split a haystack into sentences (after ``.``, ``!`` or ``?`` followed by white space), spacing normalised."""
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]


def is_needle_record(record) -> bool:
    """A JSON record that describes a NIAH trial (has ``haystack``, ``needle`` and ``question``)."""
    return isinstance(record, dict) and all(k in record for k in NEEDLE_FIELDS)


def needle_prompt_set(model, records, *, name: str = "needles") -> PromptSet:
    """NIAH trials from a user's own needles, one record each, as a ``PromptSet`` for the retrieval probe.

    Record fields: ``haystack`` (text), ``needle`` (the sentence to insert), ``question``, and optionally
    ``answer`` (the phrase the model should produce and the span to find; Retrieval_Head calls it ``real_needle``,
    also accepted; default: the needle itself) and ``depth`` (percent of the haystack, default 50). The needle goes
    in at ``depth`` moved back to a sentence boundary (in text space, whatever the tokenizer); the prompt ends with
    Retrieval_Head's question line ``"Based on the content of the book, Question: ...\nAnswer:"``; the reference
    answer (``" " + answer``) is appended for the teacher-forced pass. The needle span is the first prompt window
    whose token set overlaps the answer's by more than 0.9, the answer tokenized with a leading space and, failing
    that, without one (as the reference tokenizes it); None where neither is found (the trial then fails, with
    that reason recorded).
    """
    tok = model.tokenizer
    ids, meta = [], []
    for i, rec in enumerate(records):
        if not is_needle_record(rec):
            need = ", ".join(NEEDLE_FIELDS)
            raise AttnlabError(f"{name}: record {i + 1} needs {need} (and optionally answer, depth)")
        answer = str(rec.get("answer", rec.get("real_needle", rec["needle"]))).strip()
        depth = float(rec.get("depth", 50.0))
        if not answer:
            raise AttnlabError(f"{name}: record {i + 1} has an empty answer")
        if not 0.0 <= depth <= 100.0:
            raise AttnlabError(f"{name}: record {i + 1}: depth must be in [0, 100], got {depth}")
        context, _ = insert_at_depths(_sentences(str(rec["haystack"])), [(depth, " ".join(str(rec["needle"]).split()))])
        prompt = context + USER_QUESTION.format(question=" ".join(str(rec["question"]).split()))
        prompt_ids = model.token_ids(prompt, index=i)
        answer_ids = list(tok(" " + answer, add_special_tokens=False)["input_ids"])
        span = needle_token_span(prompt_ids, answer_ids)
        if span is None:
            span = needle_token_span(prompt_ids, list(tok(answer, add_special_tokens=False)["input_ids"]))
        ids.append(prompt_ids + answer_ids)
        meta.append(
            {
                "prompt_len": len(prompt_ids),
                "answer_ids": answer_ids,
                "answer": answer,
                "needle_span": list(span) if span is not None else None,
                "depth": depth,
                "length": len(prompt_ids),
            }
        )
    if not ids:
        raise AttnlabError(f"{name} holds no needle records")
    return PromptSet(name=f"{name}(n={len(ids)})", token_ids=ids, meta=meta)


def default_grid(model, n_prompts: int) -> tuple[list[int], list[float]]:
    """Lengths x depths with about ``n_prompts`` cells, lengths from 128 (or less) to ``min(n_ctx - 8, 1000)``."""
    top = int(min(model.n_ctx - 8, 1000))
    low = int(min(128, top))
    n_len = max(1, int(round(np.sqrt(n_prompts))))
    n_depth = max(1, int(np.ceil(n_prompts / n_len)))
    lengths = sorted({int(x) for x in np.linspace(low, top, n_len)})
    depths = [float(d) for d in np.linspace(0, 100, n_depth)]
    return lengths, depths


def niah_dataset(model, n_prompts: int, seed: int) -> PromptSet:
    """``attnlab scan --dataset niah``: about ``n_prompts`` trials on the default grid, truncated to ``n_prompts``."""
    lengths, depths = default_grid(model, n_prompts)
    ps = niah_prompt_set(model, lengths=lengths, depths=depths, seed=seed)
    if len(ps) > n_prompts:
        ps = PromptSet(
            name=ps.name + f"[:{n_prompts}]", token_ids=ps.token_ids[:n_prompts], meta=ps.meta[:n_prompts], seed=seed
        )
    return ps
