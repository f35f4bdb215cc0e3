"""Typed probe results.

``HeadScores``: one number per (layer, query head), NaN where a head was not scored.
``TokenScores``: per-token values for one prompt (one or several rows, e.g. one per layer), with the tokens.

Both carry their provenance (probe, parameters, model id, dataset fingerprint, attnlab version, time) and have
``to_frame()``, ``top(k)``, ``plot()``, ``save(dir)`` and ``load(dir)``. On disk a result named ``NAME`` is
``NAME.json`` (metadata) + ``NAME.safetensors`` (arrays); both are written atomically, arrays first, so a
metadata file always points at complete arrays.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab import __version__
from attnlab.heads.formats import format_head
from attnlab.heads.io import read_arrays, read_json, write_arrays, write_json


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _version() -> str:
    return __version__


@dataclass
class HeadScores:
    """A layers x heads score grid from one probe.

    Attributes
    ----------
    scores : ndarray of shape (n_layers, n_heads)
        One score per query head; NaN = not scored.
    name : str
        Result name, unique within a run (e.g. ``"first_token_sink"``).
    probe : str
        The probe that produced it.
    params : dict
        The probe's parameters.
    model : str
        Model id as given to ``attnlab.load``.
    dataset : str
        Fingerprint of the inputs (hash of token ids) so results on different inputs are never mixed up.
    n_kv_heads : int or None
        KV heads per layer (GQA); ``per_kv_head()`` aggregates query heads of a KV group.
    higher_is : str
        ``"more"`` if a higher score means more of the property (the default), ``"less"`` otherwise.
    extra : dict of str -> ndarray
        Further arrays (e.g. per-head counts, standard errors).
    """

    scores: np.ndarray
    name: str
    probe: str
    params: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    dataset: str = ""
    n_kv_heads: int | None = None
    higher_is: str = "more"
    description: str = ""
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    attnlab_version: str = field(default_factory=_version)
    created: str = field(default_factory=_now)

    kind = "head_scores"

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.ndim != 2:
            raise ValueError(f"HeadScores.scores must be 2-D (layers x heads), got shape {self.scores.shape}")

    @property
    def n_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def n_heads(self) -> int:
        return self.scores.shape[1]

    def to_frame(self) -> pd.DataFrame:
        """One row per head: layer, head, label ("L3H7"), score, rank (1 = strongest)."""
        layers, heads = np.meshgrid(np.arange(self.n_layers), np.arange(self.n_heads), indexing="ij")
        df = pd.DataFrame(
            {
                "layer": layers.ravel(),
                "head": heads.ravel(),
                "label": [format_head(l, h) for l, h in zip(layers.ravel(), heads.ravel())],
                "score": self.scores.ravel(),
            }
        )
        ascending = self.higher_is == "less"
        df["rank"] = df["score"].rank(ascending=ascending, method="min", na_option="keep")
        return df

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k strongest heads (NaN excluded), strongest first."""
        df = self.to_frame().dropna(subset=["score"])
        return df.sort_values("score", ascending=self.higher_is == "less", kind="stable").head(k).reset_index(drop=True)

    def top_heads(self, k: int = 10) -> list[tuple[int, int]]:
        """The k strongest heads as ``(layer, head)`` tuples."""
        return [(int(r.layer), int(r.head)) for r in self.top(k).itertuples()]

    def per_kv_head(self, reduce: str = "max") -> np.ndarray:
        """Aggregate query-head scores per KV head (GQA): array (n_layers, n_kv_heads), by ``max`` or ``mean``."""
        n_kv = self.n_kv_heads or self.n_heads
        if self.n_heads % n_kv:
            raise ValueError(f"{self.n_heads} query heads do not split into {n_kv} KV groups")
        grouped = self.scores.reshape(self.n_layers, n_kv, self.n_heads // n_kv)
        if reduce == "max":
            return np.nanmax(grouped, axis=-1)
        if reduce == "mean":
            return np.nanmean(grouped, axis=-1)
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")

    def __repr__(self) -> str:
        finite = np.isfinite(self.scores)
        if not finite.any():
            why = self.summary.get("note") if isinstance(self.summary, dict) else None
            what = f"not scored{': ' + str(why) if why else ' (every value undefined)'}"
        else:
            top = ", ".join(f"{r.label} {r.score:.3g}" for r in self.top(3).itertuples())
            what = f"{'lowest' if self.higher_is == 'less' else 'top'}: {top}"
        kv = f" ({self.n_kv_heads} KV)" if self.n_kv_heads and self.n_kv_heads != self.n_heads else ""
        return f"HeadScores({self.name!r}, {self.model or '?'}, {self.n_layers} x {self.n_heads} heads{kv}; {what})"

    def _repr_html_(self) -> str:
        from attnlab.notebook import grid_html, head_table_html, html_escape

        head = (
            f"<b>{html_escape(self.name)}</b> — {html_escape(self.model)}, probe {html_escape(self.probe)}, "
            f"{self.n_layers} x {self.n_heads} heads, {'lower' if self.higher_is == 'less' else 'higher'} is more"
        )
        desc = (
            f"<div style='font-size:85%;color:#555'>{html_escape(self.description)}</div>" if self.description else ""
        )
        if not np.isfinite(self.scores).any():
            why = html_escape(self.summary.get("note", "every value undefined"))
            return f"<div>{head}{desc}<div>not scored: {why}</div></div>"
        return (
            f"<div>{head}{desc}<div style='display:flex;gap:24px;align-items:flex-start'>"
            f"<div>{grid_html(self.scores, title='layers x heads (hover a cell)')}</div>"
            f"<div>{head_table_html(self.top(8))}</div></div></div>"
        )

    def plot(self, title: str | None = None):
        """Plotly heatmap (layers x heads); the same figure the app shows."""
        from attnlab.figures import head_map  # plotly loads only when a figure is drawn (start-up time)

        return head_map(self, title=title)

    def _meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "probe": self.probe,
            "params": self.params,
            "model": self.model,
            "dataset": self.dataset,
            "n_kv_heads": self.n_kv_heads,
            "higher_is": self.higher_is,
            "description": self.description,
            "shape": list(self.scores.shape),
            "extra": sorted(self.extra),
            "summary": self.summary,
            "attnlab_version": self.attnlab_version,
            "created": self.created,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as saved: ``scores`` and ``extra.<name>``."""
        return {"scores": self.scores, **{f"extra.{k}": np.asarray(v) for k, v in self.extra.items()}}

    def save(self, directory: str | Path) -> Path:
        """Write ``NAME.safetensors`` then ``NAME.json`` into ``directory``; returns the JSON path."""
        d = Path(directory)
        write_arrays(d / f"{self.name}.safetensors", self.arrays())
        write_json(d / f"{self.name}.json", self._meta())
        return d / f"{self.name}.json"

    @classmethod
    def load(cls, directory: str | Path, name: str) -> HeadScores:
        return cls.from_parts(*_read(directory, name, cls.kind))

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> HeadScores:
        """The result whose ``_meta()`` and ``arrays()`` these are."""
        return cls(
            scores=arrays["scores"],
            name=meta["name"],
            probe=meta["probe"],
            params=meta["params"],
            model=meta["model"],
            dataset=meta["dataset"],
            n_kv_heads=meta["n_kv_heads"],
            higher_is=meta.get("higher_is", "more"),
            description=meta.get("description", ""),
            extra={k: arrays[f"extra.{k}"] for k in meta["extra"]},
            summary=meta.get("summary", {}),
            attnlab_version=meta["attnlab_version"],
            created=meta["created"],
        )


@dataclass
class TokenScores:
    """Per-token values for one prompt.

    Attributes
    ----------
    tokens : list of str
        The prompt's tokens as the tokenizer writes them.
    values : ndarray of shape (n_rows, n_tokens)
        One row per ``row_labels`` entry (e.g. one per layer); NaN = not scored.
    row_labels : list of str
    marks : dict of str -> list of int
        Named token positions to highlight (e.g. ``{"hidden_sink": [7, 12]}``).
    prompt_index : int
        Which prompt of the dataset this is.
    """

    tokens: list[str]
    values: np.ndarray
    name: str
    probe: str
    row_labels: list[str] = field(default_factory=lambda: ["score"])
    marks: dict[str, list[int]] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    dataset: str = ""
    prompt_index: int = 0
    description: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    attnlab_version: str = field(default_factory=_version)
    created: str = field(default_factory=_now)

    kind = "token_scores"

    def __post_init__(self) -> None:
        v = np.asarray(self.values, dtype=np.float64)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != len(self.tokens):
            raise ValueError(f"TokenScores.values must be (rows, {len(self.tokens)} tokens), got {v.shape}")
        if len(self.row_labels) != v.shape[0]:
            raise ValueError(f"{len(self.row_labels)} row labels for {v.shape[0]} rows")
        self.values = v
        self.marks = {k: [int(i) for i in idx] for k, idx in self.marks.items()}

    def to_frame(self) -> pd.DataFrame:
        """Long form: one row per (row label, position) with the token, value and marks."""
        records = []
        mark_of = {}
        for mark, positions in self.marks.items():
            for p in positions:
                mark_of.setdefault(p, []).append(mark)
        for r, label in enumerate(self.row_labels):
            for pos, tok in enumerate(self.tokens):
                records.append(
                    {
                        "row": label,
                        "position": pos,
                        "token": tok,
                        "value": self.values[r, pos],
                        "marks": ",".join(mark_of.get(pos, [])),
                    }
                )
        return pd.DataFrame.from_records(records)

    def top(self, k: int = 10, row: int | str = -1) -> pd.DataFrame:
        """The k highest-valued tokens of one row (default: the last row)."""
        r = self.row_labels.index(row) if isinstance(row, str) else row
        df = pd.DataFrame({"position": np.arange(len(self.tokens)), "token": self.tokens, "value": self.values[r]})
        return (
            df.dropna(subset=["value"])
            .sort_values("value", ascending=False, kind="stable")
            .head(k)
            .reset_index(drop=True)
        )

    def __repr__(self) -> str:
        marks = ", ".join(f"{m}: {len(p)}" for m, p in self.marks.items())
        return (
            f"TokenScores({self.name!r}, {self.model or '?'}, prompt {self.prompt_index}: {len(self.tokens)} tokens x "
            f"{len(self.row_labels)} rows{'; marks ' + marks if marks else ''})"
        )

    def _repr_html_(self) -> str:
        from attnlab.notebook import html_escape, tokens_html

        marks = ", ".join(f"{html_escape(m)} at {html_escape(p[:12])}" for m, p in self.marks.items())
        return (
            f"<div><b>{html_escape(self.name)}</b> — {html_escape(self.model)}, prompt {self.prompt_index}, "
            f"{len(self.tokens)} tokens; row {html_escape(self.row_labels[-1])} shown"
            f"{'; marks: ' + marks if marks else ''}"
            f"{tokens_html(self.tokens, self.values[-1], self.marks)}</div>"
        )

    def plot(self, title: str | None = None):
        """Plotly token strip (rows x tokens); the same figure the app shows."""
        from attnlab.figures import token_strip  # (start-up time, as in HeadScores.plot)

        return token_strip(self, title=title)

    def _meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "probe": self.probe,
            "tokens": self.tokens,
            "row_labels": self.row_labels,
            "marks": self.marks,
            "params": self.params,
            "model": self.model,
            "dataset": self.dataset,
            "prompt_index": self.prompt_index,
            "description": self.description,
            "summary": self.summary,
            "attnlab_version": self.attnlab_version,
            "created": self.created,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as saved: ``values``."""
        return {"values": self.values}

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        write_arrays(d / f"{self.name}.safetensors", self.arrays())
        write_json(d / f"{self.name}.json", self._meta())
        return d / f"{self.name}.json"

    @classmethod
    def load(cls, directory: str | Path, name: str) -> TokenScores:
        return cls.from_parts(*_read(directory, name, cls.kind))

    @classmethod
    def from_parts(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> TokenScores:
        """The result whose ``_meta()`` and ``arrays()`` these are."""
        return cls(
            tokens=meta["tokens"],
            values=arrays["values"],
            name=meta["name"],
            probe=meta["probe"],
            row_labels=meta["row_labels"],
            marks=meta["marks"],
            params=meta["params"],
            model=meta["model"],
            dataset=meta["dataset"],
            prompt_index=meta["prompt_index"],
            description=meta.get("description", ""),
            summary=meta.get("summary", {}),
            attnlab_version=meta["attnlab_version"],
            created=meta["created"],
        )


def _read(directory: str | Path, name: str, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
    d = Path(directory)
    meta = read_json(d / f"{name}.json")
    if meta.get("kind") != kind:
        raise ValueError(f"{d / name}.json holds a {meta.get('kind')!r}, not a {kind!r}")
    return meta, read_arrays(d / f"{name}.safetensors")


RESULT_TYPES = {HeadScores.kind: HeadScores, TokenScores.kind: TokenScores}


def load_result(directory: str | Path, name: str) -> HeadScores | TokenScores:
    """Load a saved result of either kind by name."""
    meta = read_json(Path(directory) / f"{name}.json")
    try:
        cls = RESULT_TYPES[meta["kind"]]
    except KeyError:
        raise ValueError(f"{name}.json in {directory} is not an attnlab result") from None
    return cls.load(directory, name)
