"""Plotly figures of the notebook's attention views (``attnlab.attention``, ``attnlab.dla``): a grid of heads, two
prompts compared, and head direct logit attribution. Figures take results, never models; the app draws the same
figures (``attnlab.apps.explore``), so a notebook and the app never disagree.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnlab.figures import block_labels, downsample_pattern


def _panel(weights: np.ndarray, tokens, start: int, stop: int, max_size: int):
    """The downsampled ``[query, key]`` block of one head for a small panel, with its axis labels."""
    sub = np.asarray(weights, dtype=np.float32)[:, :stop]
    m, bq, bk = downsample_pattern(sub, max_size=max_size)
    return m, block_labels(bk, tokens, 0), block_labels(bq, tokens, start)


def pattern_grid(patterns, *, cols: int | None = None, max_size: int = 96, title: str | None = None) -> go.Figure:
    """One small query x key heatmap per head of an ``AttentionPatterns``, in a grid (what CircuitsVis's
    ``attention_heads`` shows), all on one colour scale from 0 to the largest weight; hover names the head, the
    query and key tokens and the weight. Long prompts are block-downsampled to ``max_size`` per panel (query blocks
    averaged, key blocks summed: each row keeps its mass). ``layout.meta`` holds the head labels and the grid shape.
    """
    n = len(patterns.heads)
    cols = cols or min(n, 4 if n > 4 else n)
    rows = math.ceil(n / cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        subplot_titles=patterns.labels,
        horizontal_spacing=0.04,
        vertical_spacing=0.08 if rows > 1 else 0.1,
    )
    zmax = float(np.nanmax(patterns.weights)) if patterns.weights.size else 1.0
    for i, label in enumerate(patterns.labels):
        z, x, y = _panel(patterns.weights[i], patterns.tokens, patterns.query_start, patterns.query_stop, max_size)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=x,
                y=y,
                zmin=0,
                zmax=zmax,
                colorscale="Blues",
                coloraxis=None,
                showscale=i == 0,
                colorbar={"title": "attention", "len": 0.6},
                hovertemplate=f"{label}<br>query %{{y}}<br>key %{{x}}<br>weight %{{z:.4f}}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_xaxes(showticklabels=False, type="category")
    fig.update_yaxes(showticklabels=False, autorange="reversed", type="category")
    window = (
        ""
        if (patterns.query_start, patterns.query_stop) == (0, len(patterns.tokens))
        else f", queries {patterns.query_start}-{patterns.query_stop - 1}"
    )
    fig.update_layout(
        title=title or f"attention of {n} heads — {patterns.model} ({len(patterns.tokens)} tokens{window})",
        height=max(320, 250 * rows + 80),
        margin={"l": 30, "r": 30, "t": 80, "b": 30},
        meta={"kind": "pattern_grid", "heads": patterns.labels, "grid": [rows, cols]},
    )
    return fig


def pattern_comparison(comparison, *, max_size: int = 96, max_heads: int = 6, title: str | None = None) -> go.Figure:
    """A row per head (at most ``max_heads``): its pattern on prompt A, on prompt B, and ``B - A`` on the positions
    both have (diverging colours centred on 0, red = more attention on B). ``layout.meta`` holds the heads, the
    common length, the first position where the prompts differ and each head's largest |B - A|."""
    heads = comparison.heads[:max_heads]
    labels = comparison.a.labels[: len(heads)]
    la, lb = comparison.labels
    fig = make_subplots(
        rows=len(heads),
        cols=3,
        subplot_titles=[t for lab in labels for t in (f"{lab} — {la}", f"{lab} — {lb}", f"{lab} — {lb} − {la}")],
        horizontal_spacing=0.05,
        vertical_spacing=0.06 if len(heads) > 1 else 0.1,
    )
    n = comparison.n_common
    spans = []
    for r, head in enumerate(heads):
        for c, side in enumerate((comparison.a, comparison.b)):
            z, x, y = _panel(side.full(head), side.tokens, 0, len(side.tokens), max_size)
            fig.add_trace(
                go.Heatmap(
                    z=z,
                    x=x,
                    y=y,
                    zmin=0,
                    zmax=1,
                    colorscale="Blues",
                    showscale=r == 0 and c == 0,
                    colorbar={"title": "attention", "x": 0.62, "len": 0.5},
                    hovertemplate=f"{labels[r]} {(la, lb)[c]}<br>query %{{y}}<br>key %{{x}}<br>weight %{{z:.4f}}"
                    "<extra></extra>",
                ),
                row=r + 1,
                col=c + 1,
            )
        d = comparison.difference(head)
        spans.append(float(np.abs(d).max()) if d.size else 0.0)
        dz, bq, bk = downsample_pattern(d, max_size=max_size)
        mixed = [a if a == b else f"{a}|{b}" for a, b in zip(comparison.a.tokens[:n], comparison.b.tokens[:n])]
        fig.add_trace(
            go.Heatmap(
                z=dz,
                x=block_labels(bk, mixed, 0),
                y=block_labels(bq, mixed, 0),
                colorscale="RdBu",
                reversescale=True,
                zmid=0.0,
                showscale=r == 0,
                colorbar={"title": f"{lb} − {la}", "x": 1.0, "len": 0.5},
                hovertemplate=f"{labels[r]}<br>query %{{y}}<br>key %{{x}}<br>{lb} − {la} %{{z:.4f}}<extra></extra>",
            ),
            row=r + 1,
            col=3,
        )
    fig.update_xaxes(showticklabels=False, type="category")
    fig.update_yaxes(showticklabels=False, autorange="reversed", type="category")
    first = comparison.first_difference()
    more = f" (first {len(heads)} of {len(comparison.heads)} heads)" if len(heads) < len(comparison.heads) else ""
    fig.update_layout(
        title=title
        or f"{lb} vs {la} — {comparison.a.model}: {len(comparison.a.tokens)} / {len(comparison.b.tokens)} tokens, "
        f"first differing token {first}{more}",
        height=max(340, 260 * len(heads) + 80),
        margin={"l": 30, "r": 40, "t": 90, "b": 30},
        meta={
            "kind": "pattern_comparison",
            "heads": labels,
            "n_common": n,
            "first_difference": first,
            "max_abs_difference": spans,
        },
    )
    return fig


def dla_figure(dla, *, k: int = 8, title: str | None = None) -> go.Figure:
    """Head direct logit attribution: left, the layers x heads map of each head's direct effect (diverging,
    centred on 0; hover gives the value); right, the per-source-position contributions of the ``k`` heads with
    the largest |effect| (rows) over the prompt's tokens (columns). ``layout.meta`` holds the target, the logit,
    the heads' total, the other parts and the top heads."""
    per_head = dla.values.sum(-1)
    top = dla.top(k)
    labels = list(top["label"])
    rows = np.stack([dla.values[int(r.layer), int(r.head)] for r in top.itertuples()]) if len(top) else np.zeros((0, 0))
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.35, 0.65],
        subplot_titles=("direct effect per head", f"top {len(labels)} heads by source position"),
        horizontal_spacing=0.12,
    )
    span = float(np.abs(per_head).max()) or 1.0
    fig.add_trace(
        go.Heatmap(
            z=per_head,
            x=[f"H{h}" for h in range(dla.n_heads)],
            y=[f"L{l}" for l in range(dla.n_layers)],
            colorscale="RdBu",
            reversescale=True,
            zmin=-span,
            zmax=span,
            colorbar={"title": "Δ logit", "x": 0.36, "len": 0.8},
            hovertemplate="%{y}%{x}<br>direct effect %{z:+.4f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    rspan = float(np.abs(rows).max()) if rows.size else 1.0
    fig.add_trace(
        go.Heatmap(
            z=rows,
            x=[f"{i}:{t}" for i, t in enumerate(dla.tokens)],
            y=labels,
            colorscale="RdBu",
            reversescale=True,
            zmin=-(rspan or 1.0),
            zmax=rspan or 1.0,
            colorbar={"title": "Δ logit", "x": 1.0, "len": 0.8},
            hovertemplate="%{y} reading %{x}<br>%{z:+.4f}<extra></extra>",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(autorange="reversed", type="category", row=1, col=2)
    fig.update_xaxes(tickangle=-60, type="category", row=1, col=2)
    fig.update_layout(
        title=title
        or f"head DLA — {dla.model}: {dla.target} at {dla.query}:{dla.tokens[dla.query]!r} = {dla.logit:.3f} "
        f"(heads {float(dla.values.sum()):+.3f})",
        height=max(380, 28 * dla.n_layers + 200),
        margin={"l": 60, "r": 30, "t": 80, "b": 110},
        meta={
            "kind": "head_dla",
            "target": dla.target,
            "logit": dla.logit,
            "heads_total": float(dla.values.sum()),
            "parts": dict(dla.parts),
            "top": labels,
        },
    )
    return fig


__all__ = ["dla_figure", "pattern_comparison", "pattern_grid"]
