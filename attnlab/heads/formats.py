"""Head labels: ``"L3H7"`` <-> ``(3, 7)``; also the ``"3-7"`` form used by the Retrieval_Head reference files."""

from __future__ import annotations

import re

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
    """Write Retrieval_Head's format ``{"L-H": [score per successful trial]}`` (atomically).

    ``trial_scores``: array ``(n_trials, n_layers, n_heads)`` (e.g. ``HeadScores.extra["trial_scores"]``) or a
    ``HeadScores`` (its ``trial_scores`` extra if present, else its mean scores as one trial).
    """
    import numpy as np

    from attnlab.heads.io import write_json

    if hasattr(trial_scores, "scores"):
        hs = trial_scores
        trial_scores = hs.extra.get("trial_scores", hs.scores[None])
    arr = np.asarray(trial_scores, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"trial scores must be (n_trials, n_layers, n_heads), got shape {arr.shape}")
    write_json(
        path, {f"{l}-{h}": [float(x) for x in arr[:, l, h]] for l in range(arr.shape[1]) for h in range(arr.shape[2])}
    )


def read_retrieval_head_json(path, n_layers: int | None = None, n_heads: int | None = None):
    """Read a Retrieval_Head ``{"L-H": [scores]}`` file -> ``(mean (n_layers, n_heads), {(l, h): [scores]})``.

    The grid is sized from the labels unless given (then labels outside it raise); heads with no scores are NaN.
    """
    import numpy as np

    from attnlab.heads.io import read_json

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
    import numpy as np

    from attnlab.heads.io import _atomic_replace

    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"DuoAttention values must be (n_layers, n_kv_heads), got shape {arr.shape}")
    text = "\n".join("\t".join(repr(float(x)) for x in row) for row in arr) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    from pathlib import Path

    _atomic_replace(Path(path), write)


def read_duo_tsv(path, n_layers: int | None = None, n_kv_heads: int | None = None):
    """Read a DuoAttention TSV -> array ``(n_layers, n_kv_heads)``, validated against the given counts (the
    reference loader does not check them)."""
    import numpy as np

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
