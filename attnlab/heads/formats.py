"""Head labels (``"L3H7"`` <-> ``(3, 7)``, and the ``"3-7"`` form of the Retrieval_Head files), and the files the
reference tools publish: readers and writers, and importers that turn them into runs ``attnlab show`` and the app
open like any other (``attnlab import retrieval-head | duo | headvis FILE --out RUN``).

- Retrieval_Head (Wu et al., ``nightdessert/Retrieval_Head``, ``head_score/MODEL.json``): one JSON object on one
  line, ``{"L-H": [score per successful trial]}``; its scripts read it with ``json.loads(file.readline())``.
- DuoAttention (``mit-han-lab/duo-attention``, ``attn_patterns/MODEL/.../full_attention_heads.tsv`` +
  ``config.json``): one row per layer, one gate per KV head, tab-separated. Its loader clips gates to [0, 1]; a
  deployment turns them into full / streaming KV heads by a sparsity quantile (``duo_full_heads``).
- HeadVis (Neuronpedia, ``head-metrics/*.json``): ``{"config": {...}, "metrics": {name: [layer][head] grid, ...,
  "counts": {...}}}`` with six per-head statistics computed on ``config.n_sequences`` sequences of
  ``config.seq_len`` tokens.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from attnlab.errors import AttnlabError
from attnlab.heads.io import atomic_write, read_json, write_text

_HEAD_RE = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.IGNORECASE)
_DASH_RE = re.compile(r"^\s*(\d+)-(\d+)\s*$")


def format_head(layer: int, head: int) -> str:
    """``format_head(3, 7) == "L3H7"``."""
    return f"L{int(layer)}H{int(head)}"


def parse_head(label: str) -> tuple[int, int]:
    """Parse ``"L3H7"`` or ``"3-7"`` into ``(3, 7)``."""
    m = _HEAD_RE.match(label) or _DASH_RE.match(label)
    if not m:
        raise ValueError(f"not a head label: {label!r} (expected like 'L3H7' or '3-7')")
    return int(m.group(1)), int(m.group(2))


# ---- reference file formats of retrieval / streaming heads ------------------------------------------------------


def write_retrieval_head_json(path, trial_scores) -> None:
    """Write Retrieval_Head's format ``{"L-H": [score per successful trial]}`` on ONE line (atomically), so the
    reference scripts, which read these files with ``json.loads(file.readline())``, can read it.

    ``trial_scores``: array ``(n_trials, n_layers, n_heads)`` (e.g. ``HeadScores.extra["trial_scores"]``) or a
    ``HeadScores`` (its ``trial_scores`` extra if present, else its mean scores as one trial).
    """

    if hasattr(trial_scores, "scores"):
        hs = trial_scores
        trial_scores = hs.extra.get("trial_scores", hs.scores[None])
    arr = np.asarray(trial_scores, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"trial scores must be (n_trials, n_layers, n_heads), got shape {arr.shape}")

    obj = {f"{l}-{h}": [float(x) for x in arr[:, l, h]] for l in range(arr.shape[1]) for h in range(arr.shape[2])}
    write_text(path, json.dumps(obj) + "\n")


def read_retrieval_head_json(path, n_layers: int | None = None, n_heads: int | None = None):
    """Read a Retrieval_Head ``{"L-H": [scores]}`` file -> ``(mean (n_layers, n_heads), {(l, h): [scores]})``.

    The grid is sized from the labels unless given (then labels outside it raise); heads with no scores are NaN.
    """

    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of 'layer-head' -> list of scores")
    lists = {parse_head(k): [float(x) for x in (v if isinstance(v, list) else [v])] for k, v in raw.items()}
    L = n_layers if n_layers is not None else max((l for l, _ in lists), default=-1) + 1
    H = n_heads if n_heads is not None else max((h for _, h in lists), default=-1) + 1
    grid = np.full((L, H), np.nan)
    for (l, h), vals in lists.items():
        if l >= L or h >= H:
            raise ValueError(f"{path}: head {l}-{h} outside a {L} x {H} grid")
        if vals:
            grid[l, h] = float(np.mean(vals))
    return grid, lists


def write_duo_tsv(path, values) -> None:
    """Write DuoAttention's ``full_attention_heads.tsv``: one row per layer, one tab-separated value per KV head."""

    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"DuoAttention values must be (n_layers, n_kv_heads), got shape {arr.shape}")
    text = "\n".join("\t".join(repr(float(x)) for x in row) for row in arr) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def read_duo_tsv(path, n_layers: int | None = None, n_kv_heads: int | None = None):
    """Read a DuoAttention TSV -> array ``(n_layers, n_kv_heads)``, validated against the given counts (the
    reference loader does not check them)."""
    with open(path, encoding="utf-8") as f:
        rows = [line.split() for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: rows have different numbers of values {sorted(widths)}")
    arr = np.array([[float(x) for x in r] for r in rows])
    if n_layers is not None and arr.shape[0] != n_layers:
        raise ValueError(f"{path}: {arr.shape[0]} layers, model has {n_layers}")
    if n_kv_heads is not None and arr.shape[1] != n_kv_heads:
        raise ValueError(f"{path}: {arr.shape[1]} KV heads per layer, model has {n_kv_heads}")
    return arr


def clip_duo_gates(values):
    """Gates clipped to [0, 1], as DuoAttention's loader does (trained gates stray slightly outside)."""
    return np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)


def duo_full_heads(gates, *, sparsity: float | None = None, threshold: float = 0.5, seed: int = 0):
    """Full (True) / streaming (False) KV heads from DuoAttention gates ``(n_layers, n_kv_heads)``.

    - ``sparsity`` given (DuoAttention's deployment rule): gates clipped to [0, 1], tie-breaking noise
      ``U(0, 1e-6)`` added (seeded here; the reference draws it unseeded), then a head is full when its gate is at
      least the ``sparsity`` quantile of all gates, so about ``1 - sparsity`` of the heads stay full;
      ``sparsity >= 1`` makes none full, ``<= 0`` all.
    - otherwise the threshold rule: full when the clipped gate is ``>= threshold`` (DuoAttention's default 0.5).
    """
    g = clip_duo_gates(gates)
    if sparsity is None:
        return g >= float(threshold)
    if sparsity >= 1:
        return np.zeros(g.shape, dtype=bool)
    if sparsity <= 0:
        return np.ones(g.shape, dtype=bool)
    noisy = g + np.random.default_rng(seed).uniform(0.0, 1e-6, g.shape)
    return noisy >= np.quantile(noisy, float(sparsity))


def expand_kv_heads(values, n_heads: int):
    """Per-KV-head values ``(n_layers, n_kv_heads)`` -> per query head ``(n_layers, n_heads)``: each KV head's value
    repeated for the query heads of its group (query head h belongs to KV head ``h // (n_heads // n_kv_heads)``)."""
    arr = np.asarray(values)
    n_kv = arr.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads do not split into {n_kv} KV groups")
    return np.repeat(arr, n_heads // n_kv, axis=1)


# Query heads per layer of the models DuoAttention publishes patterns for (their config.json does not say; the TSV
# gives layers and KV heads). Other models: pass n_heads.
DUO_QUERY_HEADS = {
    "Llama-2-7B-32K-Instruct": 32,
    "Llama-3-8B-Instruct-Gradient-1048k": 32,
    "Llama-3-8B-Instruct-Gradient-4194k": 32,
    "Meta-Llama-3.1-8B-Instruct": 32,
    "Meta-Llama-3.1-70B-Instruct": 64,
    "Mistral-7B-Instruct-v0.2": 32,
}

HEADVIS_METRICS = {
    "self_attention_score": "mean attention of a token to itself (HeadVis)",
    "prev_token_score": "mean attention of a token to the previous token (HeadVis)",
    "pattern_entropy": "mean entropy of the attention rows, nats (HeadVis)",
    "qk_distance": "mean query-key distance under the attention weights, tokens (HeadVis)",
    "qk_distance_variance": "variance of the query-key distance under the attention weights (HeadVis)",
    "induction_score": "mean attention to the token after an earlier copy of the current token (HeadVis)",
}


# ---- import into runs -------------------------------------------------------------------------------------------


def _fail(msg: str):
    return AttnlabError(msg)


def _read_json_file(path):
    p = Path(path)
    if not p.is_file():
        raise _fail(f"{path} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(f"{path} is not valid JSON: {e}") from None


def _source(path, fmt: str) -> dict:
    p = Path(path).resolve()
    return {"format": fmt, "source": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


def _new_run(out, model: dict, dataset: dict, probe: str, params: dict, imported: dict):
    from attnlab.heads.runs import INDEX, Run  # not at the top: runs and results import this module

    if (Path(out) / INDEX).exists():
        raise _fail(f"{out} already holds a run; import into a new directory")
    model = {"architecture": "unknown (imported)", "modality": "text", **model}
    return Run.create(out, model=model, dataset=dataset, probes=[{"name": probe, "params": params}], imported=imported)


def import_retrieval_head(path, out, *, model: str | None = None, n_kv_heads: int | None = None):
    """A Retrieval_Head score file -> a run holding ``retrieval_heads`` (mean over each head's trials, as the
    reference ranks heads; NaN where a head has none) with the per-head trial counts and, when every head has the
    same number of trials, the ``trial_scores`` array (so ``write_retrieval_head_json`` writes the file back).

    The grid is sized from the labels; ``model`` names the model (default: the file name); ``n_kv_heads`` records
    GQA where known. Means above 1 are kept (the reference does not deduplicate trials).
    """

    from attnlab.heads.results import HeadScores  # not at the top: results imports this module

    raw = _read_json_file(path)
    if not isinstance(raw, dict) or not raw:
        raise _fail(f"{path}: expected a Retrieval_Head file, one JSON object of 'layer-head' -> list of scores")
    try:
        grid, lists = read_retrieval_head_json(path)
    except (ValueError, TypeError) as e:
        raise _fail(f"{path}: {str(e).splitlines()[0]}") from None
    L, H = grid.shape
    counts = np.zeros((L, H))
    for (l, h), vals in lists.items():
        counts[l, h] = len(vals)
    n = {len(v) for v in lists.values()}
    extra = {"n_trials": counts}
    if len(n) == 1 and len(lists) == L * H and n.pop() > 0:
        extra["trial_scores"] = np.stack(
            [np.array([[lists[(l, h)][t] for h in range(H)] for l in range(L)]) for t in range(int(counts.max()))]
        )
    if n_kv_heads is not None and (n_kv_heads < 1 or H % n_kv_heads):
        raise _fail(f"--n-kv-heads {n_kv_heads} does not divide the file's {H} heads per layer")
    name = model or Path(path).stem
    finite = grid[np.isfinite(grid)]
    summary = {
        "source_format": "Retrieval_Head",
        "n_trials": int(counts.max()) if counts.size else 0,
        "retrieval_threshold": 0.1,
        "n_retrieval_heads": int((finite > 0.1).sum()),
        "max_score": float(finite.max()) if finite.size else float("nan"),
    }
    imported = _source(path, "retrieval_head")
    run = _new_run(
        out,
        {"name": name, "n_layers": L, "n_heads": H, "n_kv_heads": n_kv_heads},
        {"name": f"Retrieval_Head NIAH trials ({summary['n_trials']} passed)", "n_prompts": summary["n_trials"]},
        "retrieval_heads",
        {"source": "Retrieval_Head"},
        imported,
    )
    run.add(
        HeadScores(
            scores=grid,
            name="retrieval_heads",
            probe="retrieval_heads",
            params={"source": "Retrieval_Head", "file": imported["source"]},
            model=name,
            dataset=imported["sha256"][:16],
            n_kv_heads=n_kv_heads,
            description=f"copy-paste retrieval score (Wu et al. 2024), imported from Retrieval_Head: mean over "
            f"{summary['n_trials']} successful trials (scores can exceed 1: trials are not deduplicated)",
            extra=extra,
            summary=summary,
        )
    )
    return run


def import_duo(
    path,
    out,
    *,
    config=None,
    n_heads: int | None = None,
    model: str | None = None,
    sparsity: float | None = None,
    threshold: float = 0.5,
    seed: int = 0,
):
    """A DuoAttention ``full_attention_heads.tsv`` (+ its ``config.json``) -> a run holding ``duo_gates`` (gates
    clipped to [0, 1] as DuoAttention's loader does, expanded from KV heads to query heads, ``n_kv_heads`` set) and
    ``duo_full_heads`` (1 = full, 0 = streaming, per query head) by DuoAttention's quantile rule when ``sparsity``
    is given, else by the threshold rule (gate >= ``threshold``).

    ``config``: the ``config.json`` beside the TSV (default: that file where it exists); it gives the model name,
    sink and recent sizes. ``n_heads`` (query heads per layer) is needed unless the model is one DuoAttention
    publishes patterns for (``DUO_QUERY_HEADS``).
    """

    from attnlab.heads.results import HeadScores  # not at the top: results imports this module

    tsv = Path(path)
    if not tsv.is_file():
        raise _fail(f"{path} does not exist")
    try:
        raw = read_duo_tsv(tsv)
    except ValueError as e:
        raise _fail(str(e).splitlines()[0]) from None
    cfg_path = Path(config) if config is not None else tsv.with_name("config.json")
    cfg = {}
    if config is not None or cfg_path.is_file():
        cfg = _read_json_file(cfg_path)
        if not isinstance(cfg, dict):
            raise _fail(f"{cfg_path}: expected DuoAttention's config.json (a JSON object)")
    name = model or Path(str(cfg.get("model_name", ""))).name or tsv.parent.name
    L, n_kv = raw.shape
    H = n_heads if n_heads is not None else DUO_QUERY_HEADS.get(name)
    if H is None:
        raise _fail(
            f"the number of query heads of {name!r} is not in the file; pass --n-heads "
            f"(known: {', '.join(DUO_QUERY_HEADS)})"
        )
    if H < n_kv or H % n_kv:
        raise _fail(f"{H} query heads do not split into the file's {n_kv} KV heads per layer")
    if sparsity is not None and not 0.0 <= sparsity <= 1.0:
        raise _fail(f"--sparsity must be in [0, 1], got {sparsity}")
    gates = clip_duo_gates(raw)
    full = duo_full_heads(raw, sparsity=sparsity, threshold=threshold, seed=seed)
    rule = (
        {"rule": "quantile", "sparsity": sparsity, "seed": seed}
        if sparsity is not None
        else {"rule": "threshold", "threshold": threshold}
    )
    kept = {k: cfg[k] for k in ("sink_size", "recent_size", "reg_weight", "num_steps", "max_length") if k in cfg}
    summary = {
        "source_format": "DuoAttention",
        "n_kv_heads": n_kv,
        "clipped": int(((raw < 0) | (raw > 1)).sum()),
        "raw_min": float(raw.min()),
        "raw_max": float(raw.max()),
        **kept,
    }
    imported = _source(tsv, "duo")
    if cfg:
        imported["config"] = str(cfg_path.resolve())
    run = _new_run(
        out,
        {"name": name, "n_layers": L, "n_heads": int(H), "n_kv_heads": n_kv},
        {"name": f"DuoAttention calibration ({cfg.get('dataset_format', 'unknown data')})", "n_prompts": None},
        "duo_attention",
        {"source": "DuoAttention", **rule},
        imported,
    )
    common = dict(probe="duo_attention", model=name, dataset=imported["sha256"][:16], n_kv_heads=n_kv)
    run.add(
        HeadScores(
            scores=expand_kv_heads(gates, int(H)),
            name="duo_gates",
            params={"source": "DuoAttention", "clip": [0.0, 1.0]},
            description="DuoAttention gate per KV head (clipped to [0, 1]), shown on each query head of the group; "
            "high = full attention, low = streaming (sink + recent)",
            extra={"kv_gates": raw},
            summary=summary,
            **common,
        )
    )
    frac = float(full.mean())
    run.add(
        HeadScores(
            scores=expand_kv_heads(full.astype(np.float64), int(H)),
            name="duo_full_heads",
            params={"source": "DuoAttention", **rule},
            description=f"full (1) or streaming (0) KV head by DuoAttention's {rule['rule']} rule "
            f"({'sparsity ' + str(sparsity) if sparsity is not None else 'gate >= ' + str(threshold)}); "
            f"{frac:.0%} of KV heads full",
            summary={**summary, **rule, "full_fraction": frac},
            **common,
        )
    )
    return run


def read_headvis_json(path) -> tuple[dict, dict]:
    """A HeadVis head-metrics file -> ``(config, {metric: ndarray (n_layers, n_heads)})`` for the six metrics,
    checked to share one shape that matches ``config.num_hidden_layers`` x ``num_attention_heads`` where given."""
    raw = _read_json_file(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("metrics"), dict):
        raise _fail(f"{path}: expected a HeadVis head-metrics file ({{'config': ..., 'metrics': ...}})")
    cfg = raw.get("config") if isinstance(raw.get("config"), dict) else {}
    grids = {}
    for name in HEADVIS_METRICS:
        if name not in raw["metrics"]:
            raise _fail(f"{path}: metric {name!r} missing (has {', '.join(raw['metrics'])})")
        try:
            arr = np.array(raw["metrics"][name], dtype=np.float64)
        except (TypeError, ValueError):
            raise _fail(f"{path}: metric {name!r} is not a numeric [layer][head] grid") from None
        if arr.ndim != 2:
            raise _fail(f"{path}: metric {name!r} is not a [layer][head] grid (shape {arr.shape})")
        grids[name] = arr
    shapes = {a.shape for a in grids.values()}
    if len(shapes) != 1:
        raise _fail(f"{path}: the metrics have different shapes {sorted(shapes)}")
    (shape,) = shapes
    want = (cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"))
    if all(w is not None for w in want) and tuple(int(w) for w in want) != shape:
        raise _fail(f"{path}: grids are {shape[0]} x {shape[1]}, the config says {want[0]} x {want[1]}")
    return cfg, grids


def import_headvis(path, out, *, model: str | None = None):
    """A Neuronpedia HeadVis head-metrics JSON -> a run of six ``HeadScores`` named as its metrics
    (``self_attention_score``, ``prev_token_score``, ``pattern_entropy``, ``qk_distance``, ``qk_distance_variance``,
    ``induction_score``), with the model's name and shape and the dataset (name, sequences x length) recorded."""
    cfg, grids = read_headvis_json(path)
    L, H = next(iter(grids.values())).shape
    name = model or str(cfg.get("model_name") or "unknown")
    size = f"{cfg.get('n_sequences', '?')} x {cfg.get('seq_len', '?')} tokens"
    dataset = {
        "name": f"{cfg.get('dataset_name', 'unknown')} ({size})",
        "n_prompts": cfg.get("actual_sequences_processed", cfg.get("n_sequences")),
        "seq_len": cfg.get("seq_len"),
    }
    kept = (
        "dataset_name",
        "dataset_split",
        "n_sequences",
        "seq_len",
        "dtype",
        "attn_implementation",
        "induction_attention_threshold",
        "created_at",
        "revision",
    )
    params = {k: cfg[k] for k in kept if k in cfg}
    imported = _source(path, "headvis")
    run = _new_run(
        out,
        {"name": name, "n_layers": L, "n_heads": H, "n_kv_heads": None, "dtype": cfg.get("dtype")},
        dataset,
        "headvis",
        params,
        imported,
    )
    raw = _read_json_file(path)
    counts = raw["metrics"].get("counts", {})
    from attnlab.heads.results import HeadScores  # not at the top: results imports this module

    for metric, desc in HEADVIS_METRICS.items():
        run.add(
            HeadScores(
                scores=grids[metric],
                name=metric,
                probe="headvis",
                params=params,
                model=name,
                dataset=imported["sha256"][:16],
                description=f"{desc}; imported from Neuronpedia HeadVis",
                summary={"source_format": "HeadVis", "counts": counts if isinstance(counts, dict) else {}},
            )
        )
    return run
