"""One evaluation harness for fitted interventions: baseline vs intervened on a held-out split.

Every item is scored twice, once by the unmodified model and once inside ``intervention.apply(model)``, so the
two scores are *paired*; the confidence intervals come from a seeded paired bootstrap (the same resampled item
indices for baseline, intervened and their difference; percentile intervals). Two kinds of task:

- ``"label"``: the answer is one of a few label words, read from the next-token logits of each label's first
  token (``base.label_logits``, the same scoring that fitting uses). Metric: ``accuracy``.
- ``"generation"``: greedy decoding (full recompute per step, right padding, so every intervention sees plain
  prefill passes); the answer is the first line of the continuation, stripped. Metrics: ``exact_match`` and
  ``invalid_rate``. An output is *invalid* when its first line is empty or when the line was not finished
  (no newline and no EOS) within ``max_new_tokens`` (default: the longest answer's token count + 2). Invalid
  outputs count as wrong for exact match, and the rate is always reported (much of a "gain" can be format).

Fit/test hygiene: ``evaluate_intervention`` calls the fitted object's ``check_disjoint`` on the test prompts
and refuses (ValueError) when one was in the fit split; ``datasets.specs.check_sets_disjoint`` also compares the
*queries* of two data sets (prompts with different demonstrations can share a query). The report names the fit split
(from ``fit_split_``) and the measured one.

Data: ``attnlab.datasets.specs`` (``load_data`` reads the ``--fit`` / ``--eval`` specs into an ``EvalSet``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab.datasets.specs import EvalSet, GenerationPrompt
from attnlab.heads.io import write_json, write_text
from attnlab.interventions.base import as_labeled, label_logits
from attnlab.models.decoding import greedy_decode
from attnlab.stats import paired_bootstrap

KINDS = ("label", "generation")
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"


# ---- scoring --------------------------------------------------------------------------------------------------


def label_scores(
    model, items: Sequence[Any], *, batch_size: int = 32, desc: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """Per-item correctness (1.0 / 0.0) and predicted label of label-scored items (``desc``: a progress bar)."""
    lab = as_labeled(items)
    rows = label_logits(model, lab, batch_size=batch_size, desc=desc)
    preds = [it.labels[int(r.argmax())] for r, it in zip(rows, lab)]
    return np.array([float(p == it.label) for p, it in zip(preds, lab)]), preds


def greedy_continuations(
    model, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 32, desc: str | None = None
) -> list[tuple[str, bool]]:
    """Greedy continuation text of each prompt and whether its first line finished (newline or EOS).

    Every step is a full forward pass over the right-padded prompt + generated tokens (no KV cache,
    ``models.decoding.greedy_decode``), so hooks see ordinary prefill maps; fine for the short answers measured here.
    """
    ids = [model.token_ids(p, index=i) for i, p in enumerate(prompts)]
    runs = greedy_decode(model, ids, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc)
    return [(model.tokenizer.decode(r.tokens, skip_special_tokens=True), r.finished) for r in runs]


def generation_scores(
    model, items: Sequence[GenerationPrompt], *, max_new_tokens: int, batch_size: int = 32, desc: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-item exact match, invalid flag (empty or unfinished first line) and the answer read."""
    gens = greedy_continuations(
        model, [it.prompt for it in items], max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc
    )
    answers = [g.split("\n", 1)[0].strip() for g, _ in gens]
    invalid = np.array([float((not a) or (not finished)) for a, (_, finished) in zip(answers, gens)])
    exact = np.array([float(a == it.label and not bad) for a, it, bad in zip(answers, items, invalid)])
    return exact, invalid, answers


def default_max_new_tokens(model, items: Sequence[GenerationPrompt]) -> int:
    """Longest answer's token count (with its leading space) + 2: room for the answer and its line end."""
    return max(len(model.tokenizer(" " + it.label, add_special_tokens=False)["input_ids"]) for it in items) + 2


# ---- the harness ----------------------------------------------------------------------------------------------


@dataclass
class InterventionReport:
    """Before/after table (one row per metric, with intervals) and the facts needed to read it."""

    table: pd.DataFrame
    info: dict[str, Any]
    items: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, "metrics": self.table.to_dict(orient="records"), "items": self.items}

    def __repr__(self) -> str:
        lines = [f"{r.metric} {r.baseline:.3f} -> {r.intervened:.3f} ({r.diff:+.3f})" for r in self.table.itertuples()]
        note = f"; note: {self.info['note']}" if self.info.get("note") else ""
        return (
            f"InterventionReport({self.info.get('method')} on {self.info.get('model')}, "
            f"{self.info.get('eval_split', {}).get('name')}: {'; '.join(lines)}{note})"
        )

    def _repr_html_(self) -> str:
        from attnlab.notebook import html_escape, table_html

        cols = ["metric", "baseline", "baseline_lo", "baseline_hi", "intervened", "diff", "diff_lo", "diff_hi", "n"]
        note = self.info.get("note")
        fit, ev = self.info.get("fit_split", {}), self.info.get("eval_split", {})
        return (
            f"<div><b>{html_escape(self.info.get('method'))}</b> on {html_escape(self.info.get('model'))}: fitted on "
            f"{html_escape(fit.get('name'))} (n={fit.get('n')}), measured on {html_escape(ev.get('name'))} "
            f"(n={ev.get('n')}), paired bootstrap intervals"
            f"{table_html(self.table.to_dict(orient='records'), [c for c in cols if c in self.table.columns])}"
            + (f"<b>note:</b> {html_escape(note)}" if note else "")
            + "</div>"
        )

    def save(self, directory: str | Path) -> Path:
        """Write ``report.json`` (everything) and ``report.csv`` (the table), each atomically."""
        d = Path(directory)
        write_json(d / REPORT_JSON, self.to_dict())
        text = self.table.to_csv(index=False)
        write_text(d / REPORT_CSV, text)
        return d


def _score(
    model, data: EvalSet, max_new_tokens: int | None, batch_size: int, desc: str | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    if data.kind == "label":
        acc, preds = label_scores(model, data.items, batch_size=batch_size, desc=desc)
        return {"accuracy": acc}, preds
    exact, invalid, answers = generation_scores(
        model, data.items, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc
    )
    return {"exact_match": exact, "invalid_rate": invalid}, answers


def evaluate_intervention(
    model,
    intervention,
    data: EvalSet,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    max_new_tokens: int | None = None,
    batch_size: int = 32,
) -> InterventionReport:
    """Score ``data`` without and with the fitted ``intervention``; refuses test prompts seen by ``fit``."""
    if data.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {data.kind!r}")
    if not len(data):
        raise ValueError(f"eval data {data.name!r} is empty")
    intervention.check_disjoint(data.prompts)  # raises (also when not fitted)
    if data.kind == "generation" and max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(model, data.items)
    base, base_out = _score(model, data, max_new_tokens, batch_size, desc=f"measure baseline on {data.name}")
    with intervention.apply(model):
        treated, treated_out = _score(
            model, data, max_new_tokens, batch_size, desc=f"measure intervened on {data.name}"
        )
    rows = [{"metric": m, **paired_bootstrap(base[m], treated[m], n_boot=n_boot, seed=seed, level=level)} for m in base]
    fit_split = {k: v for k, v in intervention.fit_split_.items() if k != "digests"}
    summary = intervention.summary() if hasattr(intervention, "summary") else {}
    info = {
        "method": getattr(intervention, "name", type(intervention).__name__),
        "model": model.name,
        "params": intervention.get_params(),
        "fitted": summary,
        "fit_split": fit_split,
        "eval_split": {
            "name": data.name,
            "n": len(data),
            "kind": data.kind,
            "digest": hashlib.sha256("\n".join(data.prompts).encode("utf-8")).hexdigest(),
        },
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level, "kind": "paired percentile"},
        "max_new_tokens": max_new_tokens,
    }
    edited = intervention.edited_heads() if hasattr(intervention, "edited_heads") else None
    info["edited_heads"] = None if edited is None else [list(h) for h in edited]
    info["note"] = (intervention.does_nothing() if hasattr(intervention, "does_nothing") else None) or ""
    items = [
        {
            "prompt_sha256": hashlib.sha256(it.prompt.encode("utf-8")).hexdigest()[:16],
            "expected": it.label,
            "baseline": b,
            "intervened": t,
        }
        for it, b, t in zip(data.items, base_out, treated_out)
    ]
    return InterventionReport(pd.DataFrame(rows), info, items)


def format_table(report: InterventionReport) -> str:
    """Before/after lines for a terminal: value [lo, hi] per arm and the difference."""
    f = lambda v, lo, hi: f"{v:.3f} [{lo:.3f}, {hi:.3f}]"  # noqa: E731
    lines = [f"{'metric':<13} {'baseline':<22} {'intervened':<22} {'difference':<24} n"]
    for r in report.table.itertuples():
        lines.append(
            f"{r.metric:<13} {f(r.baseline, r.baseline_lo, r.baseline_hi):<22} "
            f"{f(r.intervened, r.intervened_lo, r.intervened_hi):<22} "
            f"{f'{r.diff:+.3f} [{r.diff_lo:+.3f}, {r.diff_hi:+.3f}]':<24} {r.n}"
        )
    if report.info.get("note"):
        lines.append(f"note: {report.info['note']}")
    return "\n".join(lines)


__all__ = [
    "InterventionReport",
    "evaluate_intervention",
    "format_table",
    "generation_scores",
    "greedy_continuations",
    "label_scores",
]
