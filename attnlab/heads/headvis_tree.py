"""Neuronpedia's HeadVis data tree: write a census's six HeadVis metrics and its sampled example sequences in the
layout the HeadVis frontend and Neuronpedia's loaders read, and read such a tree back.

The layout (Neuronpedia, ``utils/neuronpedia-utils/neuronpedia_utils/headvis/``: README and
``compute-head-metrics.py``; HeadVis: Luger, Kamath et al., Anthropic 2026) is, per model and dataset::

    DIR/config.json                  frontend config, with the run's provenance nested as "pipeline_config"
    DIR/scatter_data.json            one row per head: layer, head and the six metrics
    DIR/server_config.json           {}  (static-only frontend)
    DIR/attributions/manifest.json   {}
    DIR/heads/L{layer}H{head}.json   sampled sequences with sparse attention, and per-head aggregates

Numbers are rounded to 4 decimals; a non-finite metric is written as ``null``. In a head file each sampled
sequence carries its tokens (one string per token id), its activation interval (1 = lowest), its max activation
and its attention as sparse COO: ``attention_indices[i] = q * seq_len + k`` with ``attention_values[i]`` the weight,
``seq_len`` being that sequence's own number of tokens. The aggregates are derived from the kept entries
(``qk_distance_histogram``, ``top_query_tokens``, ``top_key_tokens``) or from every processed sequence
(``histogram`` of the per-sequence max activation, ``statistics``).

Every file is written atomically (``attnlab.heads.io``); ``config.json`` last, so a tree with a config is whole.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab.errors import AttnlabError
from attnlab.heads.io import read_json, write_json, write_text

METRICS = (
    "self_attention_score",
    "prev_token_score",
    "pattern_entropy",
    "qk_distance",
    "qk_distance_variance",
    "induction_score",
)
METRIC_DESCRIPTIONS = {
    "self_attention_score": "Average weight a query puts on its own position (the diagonal of the pattern).",
    "prev_token_score": "Average weight a query puts on the token just before it.",
    "pattern_entropy": "Average Shannon entropy (nats) of an attention row: high = spread out, low = peaked.",
    "qk_distance": "Attention-weighted mean distance |q - k| between a query and the keys it reads.",
    "qk_distance_variance": "Attention-weighted variance of the query-key distance |q - k|.",
    "induction_score": "Average weight on the token after an earlier occurrence of the query's token "
    "(weights under 0.01 ignored).",
}
HEAD_PATTERN = "L{layer}H{head}.json"
HEAD_FILE_RE = re.compile(r"^L(\d+)H(\d+)\.json$")
ACTIVATION_BINS = 50
QK_DISTANCE_EDGES = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TOP_TOKENS = 50

# the keys of Neuronpedia's pipeline_config, in its order; attnlab fills what applies and leaves the rest null
PIPELINE_KEYS = (
    "model_name",
    "np_model_id",
    "dataset_name",
    "dataset_config_name",
    "dataset_split",
    "dataset_text_field",
    "n_sequences",
    "seq_len",
    "batch_size",
    "exports_dir",
    "output_run_dir",
    "device",
    "dtype",
    "attn_implementation",
    "induction_attention_threshold",
    "trust_remote_code",
    "min_free_vram_gb",
    "streaming",
    "model_cache_dir",
    "delete_model_cache",
    "revision",
    "dataset_revision",
    "n_intervals",
    "samples_per_interval",
    "samples_per_top_interval",
    "sparse_topk_per_row",
    "sparse_threshold",
    "sample_seed",
    "warmup_size",
    "created_at",
)
# what Neuronpedia's loaders refuse to import without
REQUIRED_PROVENANCE = ("model_name", "dataset_name", "n_sequences", "seq_len", "dtype", "attn_implementation")


@dataclass
class SampledSequence:
    """One sampled sequence of one head: its sparse attention (``attention_indices = q * seq_len + k``, int32;
    ``attention_values`` float32, already rounded to 4 decimals) and where it was sampled from."""

    sequence_id: int
    interval: int  # 1 = lowest activation interval
    max_activation: float
    attention_indices: np.ndarray
    attention_values: np.ndarray
    seq_len: int


@dataclass
class HeadVisSamples:
    """What the example sampler (``attnlab.probes.headvis_examples.HeadVisExamples``) keeps over a sweep.

    Attributes
    ----------
    n_layers, n_heads : int
    sequences : dict (layer, head) -> list of SampledSequence, intervals ascending (top interval by max activation)
    tokens : dict sequence_id -> list of str, one decoded string per token id
    histogram : ndarray of shape (n_layers, n_heads, 50), int64
        Counts of every processed sequence's max activation in 50 equal bins on [0, 1].
    max_activation_sum, max_activation_count : ndarray of shape (n_layers, n_heads)
        For ``statistics.mean_max_activation``.
    params : dict
        Sampling parameters as Neuronpedia names them (n_intervals, ..., warmup_size) plus attnlab's notes.
    n_sequences : int
        Sequences of at least two tokens processed.
    max_seq_len : int
        Longest sequence processed (tokens).
    """

    n_layers: int
    n_heads: int
    sequences: dict[tuple[int, int], list[SampledSequence]] = field(default_factory=dict)
    tokens: dict[int, list[str]] = field(default_factory=dict)
    histogram: np.ndarray | None = None
    max_activation_sum: np.ndarray | None = None
    max_activation_count: np.ndarray | None = None
    params: dict[str, Any] = field(default_factory=dict)
    n_sequences: int = 0
    max_seq_len: int = 0

    def __repr__(self) -> str:
        kept = sum(len(v) for v in self.sequences.values())
        return (
            f"HeadVisSamples({self.n_layers} x {self.n_heads} heads, {self.n_sequences} sequences, "
            f"{kept} samples kept, {len(self.tokens)} distinct sequences)"
        )


def round4(value) -> float | None:
    """HeadVis's rounding: 4 decimals; None for a missing or non-finite value."""
    if value is None:
        return None
    value = float(value)
    return round(value, 4) if math.isfinite(value) else None


# ---- writing -----------------------------------------------------------------------------------------------------


def _grid(value, n_layers: int, n_heads: int, name: str) -> np.ndarray:
    if value is None:
        return np.full((n_layers, n_heads), np.nan)
    arr = np.asarray(getattr(value, "scores", value), dtype=np.float64)
    if arr.shape != (n_layers, n_heads):
        raise AttnlabError(f"HeadVis metric {name} has shape {arr.shape}, expected ({n_layers}, {n_heads})")
    return arr


def _dump(obj: Any) -> str:
    return json.dumps(obj, allow_nan=False) + "\n"


class _TokenCodes:
    """Token strings as integer codes (one table per tree), so per-head token sums are one ``bincount``."""

    def __init__(self, tokens: dict[int, list[str]]):
        self.table: list[str] = []
        index: dict[str, int] = {}
        self.codes: dict[int, np.ndarray] = {}
        for seq, toks in tokens.items():
            self.codes[seq] = np.array([index.setdefault(t, len(index)) for t in toks], dtype=np.int64)
        self.table = list(index)

    def top(self, codes: np.ndarray, weights: np.ndarray) -> list[dict[str, Any]]:
        """The ``TOP_TOKENS`` token strings with the largest summed weight; ties rank by first appearance (the
        order the entries come in), as the reference's insertion-ordered dict with a stable sort does."""
        if codes.size == 0:
            return []
        total = np.bincount(codes, weights=weights, minlength=len(self.table))
        present, first = np.unique(codes, return_index=True)
        order = np.lexsort((first, -total[present]))[:TOP_TOKENS]
        return [{"token": self.table[present[o]], "weight": round(float(total[present[o]]), 4)} for o in order]


def head_payload(samples: HeadVisSamples, layer: int, head: int, codes: _TokenCodes | None = None) -> dict[str, Any]:
    """The content of ``heads/L{layer}H{head}.json`` (``codes``: the tree's token table, built when not given)."""
    codes = codes or _TokenCodes(samples.tokens)
    seqs = samples.sequences.get((layer, head), [])
    out_seqs = []
    dist, mass, q_codes, k_codes = [], [], [], []
    for s in seqs:
        idx = np.asarray(s.attention_indices, dtype=np.int64)
        # values were rounded to 4 decimals in float32: rounding the float64 again gives the short decimal
        val = np.round(np.asarray(s.attention_values, dtype=np.float64), 4)
        out_seqs.append(
            {
                "sequence_id": int(s.sequence_id),
                "interval": int(s.interval),
                "tokens": samples.tokens[s.sequence_id],
                "attention_indices": idx.tolist(),
                "attention_values": val.tolist(),
                "seq_len": int(s.seq_len),
                "max_activation": round4(s.max_activation),
            }
        )
        if s.seq_len <= 0 or idx.size == 0:
            continue
        q, k = np.divmod(idx, s.seq_len)
        seq_codes = codes.codes[s.sequence_id]
        dist.append(np.abs(q - k))
        mass.append(val)
        q_codes.append(seq_codes[q])
        k_codes.append(seq_codes[k])
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    dist, mass = cat(dist, np.int64), cat(mass, np.float64)
    # weight of the kept entries by |q - k| in the log-spaced bins; distances past the last edge are dropped
    edges = np.asarray(QK_DISTANCE_EDGES)
    b = np.searchsorted(edges, dist, side="right") - 1
    inside = (b >= 0) & (b < len(edges) - 1)
    qk_mass = np.bincount(b[inside], weights=mass[inside], minlength=len(edges) - 1)
    count = int(samples.max_activation_count[layer, head])
    mean_max = samples.max_activation_sum[layer, head] / count if count > 0 else None
    hist_edges = np.linspace(0.0, 1.0, ACTIVATION_BINS + 1)
    return {
        "sequences": out_seqs,
        "qk_distance_histogram": {
            "bin_edges": list(QK_DISTANCE_EDGES),
            "bin_values": [round(float(v), 4) for v in qk_mass],
        },
        "top_query_tokens": codes.top(cat(q_codes, np.int64), mass),
        "top_key_tokens": codes.top(cat(k_codes, np.int64), mass),
        "histogram": {
            "bin_edges": [round(float(e), 4) for e in hist_edges],
            "bin_values": [int(c) for c in samples.histogram[layer, head]],
        },
        "statistics": {"n_samples": len(out_seqs), "mean_max_activation": round4(mean_max)},
    }


def check_headvis_target(directory: str | Path) -> Path:
    """Fail early (before any compute) when ``directory`` cannot take a HeadVis tree: a file, or a non-empty
    directory that is not already a HeadVis tree (its files are never overwritten)."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise AttnlabError(f"HeadVis output {d} exists and is not a directory")
    if d.is_dir() and any(d.iterdir()) and not (d / "config.json").is_file() and not (d / "heads").is_dir():
        raise AttnlabError(f"HeadVis output {d} is a non-empty directory that holds no HeadVis tree; choose another")
    return d


def write_headvis_tree(
    directory: str | Path,
    model_summary: dict[str, Any],
    metrics: dict[str, Any],
    examples: HeadVisSamples,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a HeadVis tree to ``directory`` (created; an earlier HeadVis tree there is replaced).

    Parameters
    ----------
    directory : the run directory (Neuronpedia puts it at ``<exports>/<np_model_id>/headvis/<dataset>/``)
    model_summary : ``LoadedModel.summary()`` (name, n_layers, n_heads, dtype, ...)
    metrics : the six HeadVis metrics by name, each a ``HeadScores`` or a ``(n_layers, n_heads)`` grid; a missing
        one is written as null
    examples : the sampler's ``HeadVisSamples``
    provenance : keys of ``pipeline_config`` (``dataset_name``, ``attn_implementation``, ``batch_size``,
        ``device``, ...) and any further attnlab keys; ``model_name``, ``dtype``, ``n_sequences`` and ``seq_len``
        default to the model and the processed sequences

    Returns the directory. Stale ``heads/L*H*.json`` files of another model are removed; a non-empty directory
    that holds no HeadVis tree is refused.
    """
    d = check_headvis_target(directory)
    n_layers, n_heads = int(model_summary["n_layers"]), int(model_summary["n_heads"])
    if (examples.n_layers, examples.n_heads) != (n_layers, n_heads):
        raise AttnlabError(
            f"examples cover {examples.n_layers} x {examples.n_heads} heads, the model has {n_layers} x {n_heads}"
        )
    grids = {name: _grid(metrics.get(name), n_layers, n_heads, name) for name in METRICS}
    prov = dict(provenance or {})

    heads_dir = d / "heads"
    wanted = set()
    codes = _TokenCodes(examples.tokens)
    for layer in range(n_layers):
        for head in range(n_heads):
            name = HEAD_PATTERN.format(layer=layer, head=head)
            wanted.add(name)
            write_text(heads_dir / name, _dump(head_payload(examples, layer, head, codes)))
    for stale in heads_dir.iterdir():
        if HEAD_FILE_RE.match(stale.name) and stale.name not in wanted and stale.is_file():
            stale.unlink()

    scatter = [
        {"layer": layer, "head": head, **{name: round4(grids[name][layer, head]) for name in METRICS}}
        for layer in range(n_layers)
        for head in range(n_heads)
    ]
    write_text(d / "scatter_data.json", _dump(scatter))
    write_text(d / "server_config.json", _dump({}))
    write_text(d / "attributions" / "manifest.json", _dump({}))

    pipeline: dict[str, Any] = {k: None for k in PIPELINE_KEYS}
    pipeline.update(
        {
            "model_name": model_summary.get("name"),
            "n_sequences": int(examples.n_sequences),
            "seq_len": int(examples.max_seq_len),
            "dtype": model_summary.get("dtype"),
            "device": model_summary.get("device"),
            "output_run_dir": str(d.resolve()),
            "exports_dir": str(d.resolve().parent),
            "trust_remote_code": False,
            "streaming": False,
            "delete_model_cache": False,
            "created_at": datetime.now(UTC).isoformat(),
        }
    )
    pipeline.update(examples.params)
    pipeline.update(prov)
    pipeline["actual_sequences_processed"] = int(examples.n_sequences)
    pipeline["num_hidden_layers"] = n_layers
    pipeline["num_attention_heads"] = n_heads
    missing = [k for k in REQUIRED_PROVENANCE if pipeline.get(k) is None]
    if missing:
        raise AttnlabError(f"HeadVis provenance lacks {', '.join(missing)}")
    config = {
        "model_name": pipeline["model_name"],
        "np_model_id": pipeline.get("np_model_id"),
        "dataset_name": pipeline["dataset_name"],
        "heads": [[layer, head] for layer in range(n_layers) for head in range(n_heads)],
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_intervals": int(pipeline.get("n_intervals") or 0),
        "metrics": list(METRICS),
        "metric_descriptions": dict(METRIC_DESCRIPTIONS),
        "head_data_pattern": HEAD_PATTERN,
        "has_umap": False,
        "umap_heads": [],
        "custom_plots": [
            {"key": "qk_distance_histogram", "label": "Q-K distance"},
            {"key": "histogram", "label": "Activation distribution"},
        ],
        "custom_tables": [
            {"key": "top_query_tokens", "label": "Top query tokens"},
            {"key": "top_key_tokens", "label": "Top key tokens"},
        ],
        "statistics_display": {
            "n_samples": {"label": "Samples kept", "format": "default"},
            "mean_max_activation": {"label": "Mean max activation", "format": "default"},
        },
        "pipeline_config": pipeline,
    }
    write_json(d / "config.json", config)
    return d


# ---- reading -----------------------------------------------------------------------------------------------------


@dataclass
class HeadVisTree:
    """A HeadVis tree on disk: ``config``, ``scatter`` (a row per head) and head files read on demand."""

    directory: Path
    config: dict[str, Any]
    scatter: list[dict[str, Any]]

    def __repr__(self) -> str:
        c = self.config
        return f"HeadVisTree({c.get('model_name')}, {c.get('n_layers')} x {c.get('n_heads')} heads, {self.directory})"

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.config.get("pipeline_config") or {})

    def heads(self) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in self.config.get("heads", [])]

    def head_path(self, layer: int, head: int) -> Path:
        pattern = self.config.get("head_data_pattern", HEAD_PATTERN)
        try:
            name = str(pattern).format(layer=int(layer), head=int(head))
        except (KeyError, IndexError, ValueError) as e:
            raise AttnlabError(f"{self.directory}: bad head_data_pattern {pattern!r} ({e})") from None
        base = (self.directory / "heads").resolve()
        path = (base / name).resolve()
        if not path.is_relative_to(base):
            raise AttnlabError(f"{self.directory}: head file {name!r} points outside heads/")
        return path

    def head(self, layer: int, head: int) -> dict[str, Any]:
        """The parsed ``heads/L{layer}H{head}.json``."""
        path = self.head_path(layer, head)
        if not path.is_file():
            raise AttnlabError(f"{self.directory}: no head file for L{layer}H{head}")
        return _read(path)

    def grids(self) -> dict[str, np.ndarray]:
        """The six metrics as ``(n_layers, n_heads)`` grids from ``scatter_data.json`` (NaN for null)."""
        n_layers, n_heads = int(self.config["n_layers"]), int(self.config["n_heads"])
        out = {name: np.full((n_layers, n_heads), np.nan) for name in METRICS}
        for row in self.scatter:
            for name in METRICS:
                v = row.get(name)
                if v is not None:
                    out[name][int(row["layer"]), int(row["head"])] = float(v)
        return out

    def to_frame(self):
        return pd.DataFrame(self.scatter)


def _read(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise AttnlabError(f"{path} cannot be read: {e}") from None


def read_headvis_tree(directory: str | Path) -> HeadVisTree:
    """Open a HeadVis tree (``config.json`` and ``scatter_data.json`` are read now, head files on demand)."""
    d = Path(directory)
    for name in ("config.json", "scatter_data.json"):
        if not (d / name).is_file():
            raise AttnlabError(f"{d} holds no HeadVis tree ({name} missing)")
    config = _read(d / "config.json")
    scatter = _read(d / "scatter_data.json")
    if not isinstance(config, dict) or not isinstance(scatter, list):
        raise AttnlabError(f"{d}: config.json must be an object and scatter_data.json a list")
    for key in ("n_layers", "n_heads"):
        if not isinstance(config.get(key), int):
            raise AttnlabError(f"{d}/config.json: {key} missing or not an integer")
    return HeadVisTree(d, config, scatter)
