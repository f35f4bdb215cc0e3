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
    fig.update_layout(title=title or f"{tokens.name} — {tokens.model}", xaxis={"tickangle": -60}, margin={"l": 80, "r": 20, "t": 50, "b": 120})
    return fig
