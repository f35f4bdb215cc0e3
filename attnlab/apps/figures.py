"""Plotly figures of results. ``HeadScores.plot()`` / ``TokenScores.plot()`` return these, and the app shows the
same figures, so a notebook and the app never disagree. Figures take results, not models."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go


def head_map(scores, title: str | None = None) -> go.Figure:
    """Layers x heads heatmap of a ``HeadScores``; hover shows the head, score and rank."""
    df = scores.to_frame()
    rank = df["rank"].to_numpy().reshape(scores.scores.shape)
    text = np.vectorize(lambda r: "" if np.isnan(r) else f"{int(r)}")(rank)
    fig = go.Figure(
        go.Heatmap(
            z=scores.scores,
            x=[f"H{h}" for h in range(scores.n_heads)],
            y=[f"L{l}" for l in range(scores.n_layers)],
            customdata=text,
            colorscale="Viridis",
            hovertemplate="%{y}%{x}<br>score %{z:.4f}<br>rank %{customdata}<extra></extra>",
            colorbar={"title": "score"},
        )
    )
    fig.update_layout(
        title=title or f"{scores.name} — {scores.model}",
        xaxis_title="head",
        yaxis_title="layer",
        yaxis={"autorange": "reversed"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


def token_strip(tokens, title: str | None = None, max_tokens: int = 400) -> go.Figure:
    """Rows x tokens heatmap of a ``TokenScores`` with token labels; marked tokens get a symbol above the strip."""
    n = len(tokens.tokens)
    keep = slice(0, min(n, max_tokens))
    labels = [f"{i}:{t}" for i, t in enumerate(tokens.tokens)][keep]
    fig = go.Figure(
        go.Heatmap(
            z=tokens.values[:, keep],
            x=labels,
            y=tokens.row_labels,
            colorscale="Magma",
            hovertemplate="%{x}<br>%{y}: %{z:.4f}<extra></extra>",
        )
    )
    for mark, positions in tokens.marks.items():
        pos = [p for p in positions if p < len(labels)]
        if pos:
            fig.add_trace(go.Scatter(x=[labels[p] for p in pos], y=[tokens.row_labels[-1]] * len(pos), mode="markers", marker={"symbol": "triangle-down", "size": 10}, name=mark))
    fig.update_layout(
        title=title or f"{tokens.name} — {tokens.model}",
        xaxis={"tickangle": -60},
        margin={"l": 80, "r": 20, "t": 50, "b": 120},
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.02, "yanchor": "bottom"},  # clear of the colorbar
    )
    return fig



def block_labels(bounds: np.ndarray, tokens, offset: int = 0) -> list[str]:
    """Axis labels of blocks ``[bounds[i], bounds[i+1])``: ``"12:tok"`` for one token, ``"12-19:tok…"`` for a block.

    Positions prefix the labels, so they are unique (plotly merges equal category labels)."""
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        tok = str(tokens[offset + s]) if offset + s < len(tokens) else ""
        out.append(f"{offset + s}:{tok}" if e - s == 1 else f"{offset + s}-{offset + e - 1}:{tok}…")
    return out


def downsample_pattern(weights: np.ndarray, max_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink a ``[q, k]`` attention matrix to at most ``max_size`` x ``max_size`` blocks for display.

    Query blocks are averaged and key blocks summed, so every displayed row keeps the mass of the rows it stands
    for (1 for a softmax row). Returns ``(matrix, q_bounds, k_bounds)``; block i spans ``[bounds[i], bounds[i+1])``.
    """
    w = np.asarray(weights, dtype=np.float32)
    nq, nk = w.shape
    bq = np.linspace(0, nq, min(nq, max_size) + 1).round().astype(int)
    bk = np.linspace(0, nk, min(nk, max_size) + 1).round().astype(int)
    if len(bq) - 1 == nq and len(bk) - 1 == nk:
        return w, bq, bk
    rows = np.add.reduceat(w, bq[:-1], axis=0) / np.diff(bq)[:, None]
    return np.add.reduceat(rows, bk[:-1], axis=1), bq, bk


def attention_pattern(weights, tokens, *, layer: int, head: int, model: str = "", window: tuple[int, int] | None = None, max_size: int = 256, title: str | None = None) -> go.Figure:
    """Query x key heatmap of one head's attention with token labels (long inputs windowed, then downsampled).

    Parameters
    ----------
    weights : array of shape (n_tokens, n_tokens)
        Post-softmax attention of head ``(layer, head)``: row = query, column = key.
    tokens : list of str
        The prompt's tokens (labels).
    window : (start, stop) or None
        Query positions to show; keys are shown from 0 to ``stop`` so the causal context stays visible.
    max_size : int, default=256
        Most rows/columns drawn; longer spans are block-downsampled (see ``downsample_pattern``).

    The figure's ``layout.meta`` holds ``layer``, ``head``, ``head_label`` and ``n_tokens``.
    """
    w = np.asarray(weights, dtype=np.float32)
    n = w.shape[0]
    start, stop = (0, n) if window is None else (max(0, int(window[0])), min(n, int(window[1])))
    if stop <= start:
        raise ValueError(f"empty window {window} for a prompt of {n} tokens")
    sub = w[start:stop, :stop]
    m, bq, bk = downsample_pattern(sub, max_size=max_size)
    shown = "" if m.shape == sub.shape else f", shown as {m.shape[0]}x{m.shape[1]} blocks"
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=block_labels(bk, tokens, 0),
            y=block_labels(bq, tokens, start),
            colorscale="Blues",
            zmin=0,
            hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.4f}<extra></extra>",
            colorbar={"title": "attention"},
        )
    )
    head_label = f"L{layer}H{head}"
    fig.update_layout(
        title=title or f"{head_label} attention — {model} ({n} tokens, queries {start}-{stop - 1}{shown})",
        xaxis={"title": "key", "tickangle": -60, "type": "category"},
        yaxis={"title": "query", "autorange": "reversed", "type": "category"},
        margin={"l": 120, "r": 20, "t": 50, "b": 120},
        meta={"layer": int(layer), "head": int(head), "head_label": head_label, "n_tokens": int(n)},
    )
    return fig
