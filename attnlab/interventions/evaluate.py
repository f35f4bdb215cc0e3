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
and refuses (ValueError) when one was in the fit split; ``check_sets_disjoint`` also compares the *queries* of
two data sets (prompts with different demonstrations can share a query). The report names the fit split
(from ``fit_split_``) and the measured one.

Data specs (``load_data``; what ``attnlab intervene --fit/--eval`` accepts)::

    classify:TASK:SPLIT[:SHOTS]   TASK sentiment | topic | all; SPLIT train | valid | test; SHOTS default 0
    icl:TASK:SPLIT[:SHOTS]        TASK an attnlab.datasets.icl task | all; SHOTS default 5 (0-10)
    PATH[:SHOTS]                  function-vectors JSON file [{"input": x, "output": y}, ...]; SHOTS default 0
    pope:SPLIT[:SEED]             VLMs: POPE-style yes/no questions about shape scenes (attnlab.datasets.shapes),
                                  SPLIT random | popular | adversarial, each with its rendered image; SEED draws
                                  the scenes (default: the run's seed), so fit and eval need different seeds

``n`` items per task (the whole file for a path, up to ``n`` when given) drawn with ``seed``. ICL and file
items are generation tasks in the ``Q: x\\nA:`` format (demonstrations of a file item come from the other
items of the same file, never its own query); their ``labels`` are the distinct outputs of the set (per task),
so label-scored fitting (ZeroTuning's gamma search, ACT's head filter) can run on them.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from attnlab.errors import AttnlabError
from attnlab.heads.io import write_json, write_text
from attnlab.interventions.base import as_labeled, label_logits

KINDS = ("label", "generation")
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"


# ---- data -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationPrompt:
    """A generation item: the expected first line of the continuation is ``label`` (stripped).

    ``labels`` (the set's distinct answers) let label-scored fitting use the item too.
    """

    prompt: str
    label: str
    labels: tuple[str, ...]
    query: str
    task: str = ""


@dataclass(frozen=True)
class ImageQuestion:
    """A label-scored VLM item: ``prompt`` holds the image placeholder, ``image`` is its PIL image.

    ``negative`` is the POPE negative type of an absent-object question (``cooccur`` for an absent partner of a
    present object: the hallucination case), ``""`` otherwise."""

    prompt: str
    label: str
    labels: tuple[str, ...]
    image: Any
    negative: str = ""

    @property
    def key(self) -> str:
        """The prompt's identity for fit/test hygiene: its text plus a digest of the image's pixels."""
        from attnlab.interventions.vhr import VisualPrompt

        return VisualPrompt(self.prompt, self.image).key


@dataclass
class EvalSet:
    """Items of one split with the spec that made them; ``kind`` says how they are scored."""

    name: str
    kind: str
    items: list
    queries: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def prompts(self) -> list[str]:
        """Item identities: the prompt text, plus the image digest for image questions."""
        return [getattr(it, "key", it.prompt) for it in self.items]


def _shots(raw: str | None, default: int, spec: str) -> int:
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise AttnlabError(f"bad data spec {spec!r}: SHOTS must be a non-negative integer, got {raw!r}")
    return int(raw)


def _task_split_shots(
    spec: str, parts: list[str], kind: str, what: str, names: list[str], *, default_shots: int
) -> tuple[str, str, list[str], int]:
    """``KIND:TASK:SPLIT[:SHOTS]`` -> (task, split, tasks, shots); TASK ``all`` means every name; one-line errors."""
    if len(parts) not in (3, 4):
        raise AttnlabError(f"bad data spec {spec!r}: expected {kind}:TASK:SPLIT[:SHOTS]")
    task, split = parts[1], parts[2]
    tasks = list(names) if task == "all" else [task]
    if any(t not in names for t in tasks):
        raise AttnlabError(f"bad data spec {spec!r}: {what} must be one of {', '.join(names)} or all")
    if split not in ("train", "valid", "test"):
        raise AttnlabError(f"bad data spec {spec!r}: split must be train, valid or test")
    return task, split, tasks, _shots(parts[3] if len(parts) == 4 else None, default_shots, spec)


def _classify(spec: str, parts: list[str], n: int, seed: int) -> EvalSet:
    from attnlab.datasets import classification as C

    task, split, tasks, k = _task_split_shots(
        spec, parts, "classify", "classification task", list(C.LABELS), default_shots=0
    )
    items = [p for t in tasks for p in C.build_eval_prompts(t, k, n, split=split, seed=seed)]
    return EvalSet(f"classify:{task}:{split}:{k}", "label", items, [p.prompt.rsplit("Text: ", 1)[-1] for p in items])


def _icl(spec: str, parts: list[str], n: int, seed: int) -> EvalSet:
    from attnlab.datasets import icl

    task, split, tasks, k = _task_split_shots(spec, parts, "icl", "ICL task", list(icl.TASK_NAMES), default_shots=5)
    if k > icl.MAX_SHOTS:
        raise AttnlabError(f"bad data spec {spec!r}: at most {icl.MAX_SHOTS} shots")
    items = []
    for t in tasks:
        ps = icl.build_eval_prompts(t, k, n, split=split, seed=seed)
        labels = tuple(sorted({p.answer for p in ps}))
        items += [
            GenerationPrompt(p.prompt, p.answer, labels, p.prompt.rsplit("Q: ", 1)[-1][: -len("\nA:")], t) for p in ps
        ]
    return EvalSet(f"icl:{task}:{split}:{k}", "generation", items, [it.query for it in items])


def _pope(spec: str, parts: list[str], n: int, seed: int) -> EvalSet:
    from attnlab.datasets import SHAPE_TEMPLATE
    from attnlab.datasets.shapes import POPE_SPLITS, pope_questions, render_scene

    if len(parts) not in (2, 3) or parts[1] not in POPE_SPLITS:
        raise AttnlabError(
            f"bad data spec {spec!r}: expected pope:SPLIT[:SEED] with SPLIT one of {', '.join(POPE_SPLITS)}"
        )
    if len(parts) == 3 and not parts[2].isdigit():
        raise AttnlabError(f"bad data spec {spec!r}: SEED must be a non-negative integer")
    split, scene_seed = parts[1], int(parts[2]) if len(parts) == 3 else seed
    pairs = pope_questions(split, n_scenes=n // 2 + 1, seed=scene_seed)[:n]  # up to 6 questions a scene
    images = {}
    items = [
        ImageQuestion(
            SHAPE_TEMPLATE.format(question=q.text),
            q.answer,
            ("yes", "no"),
            images.setdefault(id(s), render_scene(s)),
            q.negative,
        )
        for s, q in pairs
    ]
    return EvalSet(f"pope:{split}:{scene_seed}", "label", items, [it.key for it in items])


def read_function_vectors(path: str | Path) -> list[tuple[str, str]]:
    """(input, output) pairs of a function-vectors JSON file ``[{"input": x, "output": y}, ...]``."""
    p = Path(path)
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AttnlabError(f"{path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(rows, list) or not rows:
        raise AttnlabError(f'{path} must hold a non-empty JSON list of {{"input": ..., "output": ...}} records')
    pairs = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or "input" not in r or "output" not in r:
            raise AttnlabError(f"{path}: record {i} needs 'input' and 'output'")
        out = r["output"][0] if isinstance(r["output"], list) and r["output"] else r["output"]
        pairs.append((str(r["input"]).strip(), str(out).strip()))
    return pairs


def _file(spec: str, path: Path, k: int, n: int | None, seed: int) -> EvalSet:
    from attnlab.datasets.icl import format_prompt

    pairs = read_function_vectors(path)
    if k >= len(pairs):
        raise AttnlabError(f"bad data spec {spec!r}: {k} shots need more than {k} records, the file has {len(pairs)}")
    rng = random.Random(f"fv:{seed}:{path.name}")
    order = list(range(len(pairs)))
    rng.shuffle(order)
    labels = tuple(sorted({y for _, y in pairs}))
    items = []
    for i in order[: n if n is not None else len(order)]:
        others = [j for j in range(len(pairs)) if pairs[j][0] != pairs[i][0]]
        demos = [pairs[j] for j in rng.sample(others, min(k, len(others)))]
        x, y = pairs[i]
        items.append(GenerationPrompt(format_prompt(demos, x), y, labels, x, path.stem))
    return EvalSet(f"{path.name}:{k}", "generation", items, [it.query for it in items])


def data_spec_forms() -> dict[str, str]:
    """What ``load_data`` accepts: each spec form with its one-line meaning, the task, split and shot names read
    from the dataset modules. The CLI's help and ``load_data``'s error message are made from this table."""
    from attnlab.datasets import classification as C
    from attnlab.datasets import icl
    from attnlab.datasets.shapes import POPE_SPLITS

    return {
        "classify:TASK:SPLIT[:SHOTS]": f"text classification; TASK {'|'.join(C.LABELS)}|all, "
        f"SPLIT {'|'.join(icl.SPLITS)}, SHOTS default 0",
        "icl:TASK:SPLIT[:SHOTS]": f"in-context learning; TASK {'|'.join(icl.TASK_NAMES)}|all, "
        f"SPLIT {'|'.join(icl.SPLITS)}, SHOTS default 5 (at most {icl.MAX_SHOTS})",
        "pope:SPLIT[:SEED]": f"vision-language models: yes/no questions on rendered shape scenes, SPLIT "
        f"{'|'.join(POPE_SPLITS)}, SEED draws the scenes (fit and eval need different seeds)",
        "PATH[:SHOTS]": 'function-vectors JSON file [{"input": x, "output": y}, ...], SHOTS default 0',
    }


def load_data(spec: str, *, n: int = 32, seed: int = 0) -> EvalSet:
    """An ``EvalSet`` from a data spec (``data_spec_forms``); one-line AttnlabError when bad."""
    if n < 1:
        raise AttnlabError(f"n must be >= 1, got {n}")
    parts = spec.split(":")
    if parts[0] == "classify":
        return _classify(spec, parts, n, seed)
    if parts[0] == "icl":
        return _icl(spec, parts, n, seed)
    if parts[0] == "pope":
        return _pope(spec, parts, n, seed)
    path, k = Path(spec), 0
    if not path.is_file() and len(parts) > 1 and parts[-1].isdigit():
        path, k = Path(spec.rsplit(":", 1)[0]), int(parts[-1])
    if not path.is_file():
        forms = list(data_spec_forms())
        raise AttnlabError(
            f"data {spec!r} is neither {', '.join(forms[:-1])} nor an existing function-vectors JSON file {forms[-1]}"
        )
    return _file(spec, path, k, n, seed)


def check_sets_disjoint(fit: EvalSet, test: EvalSet) -> None:
    """Raise ValueError when the two sets share a prompt or a query (the item being answered)."""
    shared_p = len(set(fit.prompts) & set(test.prompts))
    shared_q = len(set(fit.queries) & set(test.queries))
    if shared_p or shared_q:
        raise ValueError(
            f"fit data {fit.name!r} and eval data {test.name!r} overlap "
            f"({shared_p} prompts, {shared_q} queries in common): measure on a held-out split"
        )


# ---- scoring --------------------------------------------------------------------------------------------------


def label_scores(
    model, items: Sequence[Any], *, batch_size: int = 32, desc: str | None = None
) -> tuple[np.ndarray, list[str]]:
    """Per-item correctness (1.0 / 0.0) and predicted label of label-scored items (``desc``: a progress bar)."""
    lab = as_labeled(items)
    rows = label_logits(model, lab, batch_size=batch_size, desc=desc)
    preds = [it.labels[int(r.argmax())] for r, it in zip(rows, lab)]
    return np.array([float(p == it.label) for p, it in zip(preds, lab)]), preds


@torch.no_grad()
def greedy_continuations(
    model, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 32, desc: str | None = None
) -> list[tuple[str, bool]]:
    """Greedy continuation text of each prompt and whether its first line finished (newline or EOS).

    Every step is a full forward pass over the right-padded prompt + generated tokens (no KV cache), so
    hooks see ordinary prefill maps; fine for the short answers measured here.
    """
    from attnlab.progress import bar

    tok = model.tokenizer
    eos = tok.eos_token_id
    out: list[tuple[str, bool]] = []
    for s in bar(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=desc is None):
        chunk = list(prompts[s : s + batch_size])
        ids = [model.token_ids(p, index=s + i) for i, p in enumerate(chunk)]
        new: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new_tokens):
            active = [i for i, d in enumerate(done) if not d]
            if not active:
                break
            batch = model.batch_from_ids([ids[i] + new[i] for i in active], active, padding_side="right")
            logits = model.forward(batch)
            last = batch.lengths.to(logits.device) - 1
            nxt = logits[torch.arange(len(active), device=logits.device), last].argmax(-1).tolist()
            for i, t in zip(active, nxt):
                if eos is not None and t == eos:
                    done[i] = True
                    continue
                new[i].append(int(t))
                if "\n" in tok.decode(new[i], skip_special_tokens=True):
                    done[i] = True
        out += [(tok.decode(n, skip_special_tokens=True), d) for n, d in zip(new, done)]
    return out


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


# ---- statistics -----------------------------------------------------------------------------------------------


def paired_bootstrap(
    baseline: Sequence[float], intervened: Sequence[float], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, float]:
    """Means of two paired per-item scores, their difference, and seeded percentile bootstrap intervals.

    One draw resamples item indices with replacement and uses them for both arms, so the difference's interval
    accounts for the pairing (identical arms give a difference of exactly 0 with interval [0, 0]).
    """
    a, b = np.asarray(baseline, dtype=float), np.asarray(intervened, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired scores need two equal-length non-empty 1-D arrays, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    ma, mb = a[idx].mean(1), b[idx].mean(1)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    lo_a, hi_a = np.percentile(ma, q)
    lo_b, hi_b = np.percentile(mb, q)
    lo_d, hi_d = np.percentile(mb - ma, q)
    return {
        "baseline": float(a.mean()),
        "baseline_lo": float(lo_a),
        "baseline_hi": float(hi_a),
        "intervened": float(b.mean()),
        "intervened_lo": float(lo_b),
        "intervened_hi": float(hi_b),
        "diff": float(b.mean() - a.mean()),
        "diff_lo": float(lo_d),
        "diff_hi": float(hi_d),
        "n": int(len(a)),
    }


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
    "EvalSet",
    "GenerationPrompt",
    "InterventionReport",
    "check_sets_disjoint",
    "evaluate_intervention",
    "format_table",
    "generation_scores",
    "greedy_continuations",
    "label_scores",
    "load_data",
    "paired_bootstrap",
    "read_function_vectors",
]
