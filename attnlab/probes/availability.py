"""Why a probe scores nothing: the one wording ``attnlab census``, ``attnlab scan`` and ``attnlab show`` share.

A probe whose inputs the model or the prompts lack (RazorAttention's echo / induction without a repeated block,
retrieval without NIAH prompts or on a bidirectional encoder, vision statistics on a text model) leaves its grid
NaN; the reason is reported as ``not scored: REASON``, never as a blank row or as zeros.
"""

from __future__ import annotations

import numpy as np

VISION_PROBES = frozenset({"vision_aware_heads", "image_centric_heads"})
ALL_UNDEFINED = "no head could be scored on these prompts (every value undefined)"


def unavailable(name: str, model, prompts, ids: list[list[int]]) -> str | None:
    """Why probe ``name`` cannot score ``model`` on ``prompts`` (token ids ``ids``), or None when it can."""
    if name == "razor_echo_induction":
        from attnlab.probes.razor_echo import find_period

        if not any(find_period(x) for x in ids):
            return "needs prompts made of a repeated block (--dataset repeated-random)"
    if name in VISION_PROBES:
        if model.modality != "vision-language":
            return "text model: no image tokens"
        if prompts.images is None:
            return "no image prompts (use a shapes dataset or prompts with images)"
    if name == "retrieval_heads":
        need = ("prompt_len", "answer_ids", "answer", "needle_span")
        if not prompts.meta or not all(isinstance(m, dict) and all(k in m for k in need) for m in prompts.meta):
            return "needs NIAH prompts with needles and answers (--dataset niah)"
        if not model.causal:
            return "bidirectional encoder: no next-token retrieval"
    return None


def scored(result) -> bool:
    """Whether a result holds at least one defined value."""
    values = getattr(result, "scores", None)
    if values is None:
        values = getattr(result, "values", None)
    return values is not None and bool(np.isfinite(np.asarray(values, dtype=float)).any())


def not_scored_reason(result, probe_reason: str | None = None) -> str | None:
    """None when ``result`` holds a defined value; else why not: the probe's reason (``unavailable``), the result's
    own note (``summary["note"]``), or that every value is undefined."""
    if scored(result):
        return None
    note = result.summary.get("note") if isinstance(getattr(result, "summary", None), dict) else None
    return probe_reason or (str(note) if note else ALL_UNDEFINED)
