"""Plotly figures of results. ``HeadScores.plot()`` / ``TokenScores.plot()`` return these, and the app shows the
same figures, so a notebook and the app never disagree. Figures take results, not models."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from attnlab.params import changed_params


def plain(text) -> str:
    """``text`` escaped for plotly, which reads labels and titles as a subset of HTML (``<b>``, ``<s>``, ``<br>``):
    ``&``, ``<`` and ``>`` become entities, so a token or name always shows as the text it is."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def param_note(result) -> str:
    """``" (ratio_threshold=10.0)"``: the probe parameters a result was computed with that differ from the probe's
    defaults, for titles; "" when all are defaults (or the result records none)."""
    params, probe = getattr(result, "params", None), getattr(result, "probe", None)
    if not isinstance(params, dict) or not params or not probe:
        return ""
    changed = changed_params("probe", str(probe), params)  # probes are known once imported (the app and CLI do)
    return f" ({', '.join(f'{k}={v}' for k, v in changed.items())})" if changed else ""


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
        title=title or f"{plain(scores.name)} — {plain(scores.model)}{plain(param_note(scores))}",
        xaxis_title="head",
        yaxis_title="layer",
        yaxis={"autorange": "reversed"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
    )
    return fig


MARK_SYMBOLS = ("triangle-down", "circle", "diamond", "square", "x", "star")


def token_strip(
    tokens,
    title: str | None = None,
    max_tokens: int = 400,
    row_scale: bool = True,
    max_rows: int = 64,
    start: int = 0,
) -> go.Figure:
    """Rows x tokens heatmap of a ``TokenScores`` with token labels; marked tokens get a symbol above the strip.

    ``row_scale`` (default) colours each row relative to its own largest magnitude, so rows on different scales
    (WAAD in tokens, FAI near 0) stay readable; the hover shows the raw value. Marks are drawn largest first with
    their own symbol, so a token with several marks (e.g. preplan and anchor) shows all of them.

    A prompt longer than ``max_tokens`` is shown a page at a time: tokens ``start`` to ``start + max_tokens - 1``;
    only the first ``max_rows`` rows are drawn. The title says which tokens are shown, of how many, how many marks
    lie outside the page, and when rows are left out. ``layout.meta`` holds ``start``, ``stop``, ``n_tokens`` and
    ``marks_outside``."""
    n = len(tokens.tokens)
    page = max(1, int(max_tokens))
    start = max(0, min(int(start), n - page))  # a start past the end shows the last page
    stop = min(n, start + page)
    keep = slice(start, stop)
    rows = min(len(tokens.row_labels), max_rows)
    labels = [f"{i}:{plain(t)}" for i, t in zip(range(start, stop), list(tokens.tokens[keep]))]
    row_labels = [plain(r) for r in tokens.row_labels[:rows]]
    raw = np.asarray(tokens.values[:rows, keep], dtype=float)
    z = raw
    if row_scale:
        peak = (
            np.abs(np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)).max(axis=1, keepdims=True)
            if raw.size
            else np.ones((raw.shape[0], 1))
        )
        z = raw / np.where(peak > 0, peak, 1.0)  # NaN stays NaN (blank cell); an all-NaN or all-zero row is left as is
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=row_labels,
            customdata=raw,
            colorscale="Magma",
            hovertemplate="%{x}<br>%{y}: %{customdata:.4f}<extra></extra>",
            colorbar={"title": "share of row max" if row_scale else "score"},
        )
    )
    marks = [(m, [p - start for p in positions if start <= p < stop]) for m, positions in tokens.marks.items()]
    outside = sum(1 for positions in tokens.marks.values() for p in positions if not start <= p < stop)
    marks = marks[: len(MARK_SYMBOLS) * 4] if row_labels else []
    for i, (mark, pos) in enumerate(m for m in marks if m[1]):
        size = max(5, 14 - 3 * i)
        symbol = MARK_SYMBOLS[i % len(MARK_SYMBOLS)]
        fig.add_trace(
            go.Scatter(
                x=[labels[p] for p in pos],
                y=[row_labels[-1]] * len(pos),
                mode="markers",
                marker={"symbol": symbol, "size": size, "line": {"width": 1, "color": "white"}},
                name=plain(mark),
            )
        )
    parts = []
    if (start, stop) != (0, n):
        parts.append(f"tokens {start}–{stop - 1} of {n}")
        if outside:
            parts.append(f"{outside} marked tokens on other pages")
    if rows < len(tokens.row_labels):
        parts.append(f"first {rows} of {len(tokens.row_labels):,} rows")
    cut = f" ({'; '.join(parts)})" if parts else ""
    fig.update_layout(
        title=title or f"{plain(tokens.name)} — {plain(tokens.model)}{plain(param_note(tokens))}{cut}",
        xaxis={
            "tickangle": -90,
            "type": "category",
            **token_ticks(np.arange(start, stop + 1) - start, tokens.tokens[start:stop], labels, 0, MAX_X_TICKS),
        },
        margin={"l": 80, "r": 20, "t": 50, "b": 120},
        meta={"start": start, "stop": stop, "n_tokens": n, "marks_outside": outside},
        legend={
            "orientation": "h",
            "x": 1,
            "xanchor": "right",
            "y": 1.02,
            "yanchor": "bottom",
        },  # clear of the colorbar
    )
    return fig


def block_labels(bounds: np.ndarray, tokens, offset: int = 0, max_chars: int = 80) -> list[str]:
    """Category names of blocks ``[bounds[i], bounds[i+1])``: ``"12:tok"`` for one token, ``"12-19:tok tok …"``
    (the block's tokens, up to ``max_chars`` characters) for a block. The hover shows them whole.

    Positions prefix the names, so they are unique (plotly merges equal category labels)."""
    out = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e - s == 1:
            tok = plain(tokens[offset + s]) if offset + s < len(tokens) else ""
            out.append(f"{offset + s}:{tok}")
            continue
        text = "".join(str(t) for t in tokens[offset + s : offset + e])
        text = text if len(text) <= max_chars else text[: max_chars - 1] + "…"
        out.append(f"{offset + s}-{offset + e - 1}:{plain(text)}")
    return out


TICK_PX = 15  # room per tick label (px): 10 px text on a line of its own, horizontal or turned 90 degrees
MAX_X_TICKS = 45  # token labels on a horizontal axis (about 16 px apiece on a 750 px wide plot)
MAX_TOKEN_CHARS = 24  # longer tokens are shortened on the axis only (the hover shows them whole)


def token_label(position: int, token) -> str:
    """What an axis shows for one token: its position and its text, whitespace made visible."""
    tok = str(token).replace("\n", "⏎").replace("\t", "⇥").replace("\r", "")
    tok = tok if len(tok) <= MAX_TOKEN_CHARS else tok[: MAX_TOKEN_CHARS - 1] + "…"
    return f"{position}:{plain(tok)}" if tok.strip() else f"{position}:␣{tok.strip()}"


def token_ticks(bounds: np.ndarray, tokens, categories: list[str], offset: int, max_ticks: int) -> dict:
    """Axis settings that label a readable subset of a token axis: at most ``max_ticks`` evenly spaced cells, each
    labelled with one whole token (the first of its block) at that token's cell, never a cut block stub."""
    m = len(categories)
    if m == 0:
        return {}
    k = max(1, min(m, int(max_ticks)))
    chosen = np.unique(np.linspace(0, m - 1, k).round().astype(int))
    text = [
        token_label(
            offset + int(bounds[i]), tokens[offset + int(bounds[i])] if offset + bounds[i] < len(tokens) else ""
        )
        for i in chosen
    ]
    return {
        "tickmode": "array",
        "tickvals": [categories[i] for i in chosen],
        "ticktext": text,
        "tickfont": {"size": 10},
        "automargin": True,
    }


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


def attention_pattern(
    weights,
    tokens,
    *,
    layer: int,
    head: int,
    model: str = "",
    window: tuple[int, int] | None = None,
    max_size: int = 256,
    title: str | None = None,
    log: bool = False,
    height: int = 650,
) -> go.Figure:
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
    log : bool, default=False
        Colour by log10 of the weight (from 1e-5), so the rest of a row stays visible next to a sink.
    height : int, default=650
        Figure height (px); it sets how many token labels fit on the query axis.

    Colour is the share of the query's attention on the key (each row sums to 1); a block is the mean over its
    queries of the sum over its keys. Each axis labels a readable subset of whole tokens (``token_ticks``, one
    per 15 px); the hover gives every cell's full tokens. The figure's ``layout.meta`` holds ``layer``, ``head``,
    ``head_label``, ``n_tokens`` and ``log``.
    """
    w = np.asarray(weights, dtype=np.float32)
    n = w.shape[0]
    start, stop = (0, n) if window is None else (max(0, int(window[0])), min(n, int(window[1])))
    if stop <= start:
        raise ValueError(f"empty window {window} for a prompt of {n} tokens")
    sub = w[start:stop, :stop]
    m, bq, bk = downsample_pattern(sub, max_size=max_size)
    blocks = m.shape != sub.shape
    shown = "" if not blocks else f", shown as {m.shape[0]}x{m.shape[1]} blocks"
    xs, ys = block_labels(bk, tokens, 0), block_labels(bq, tokens, start)
    colour, scale = _colour(m, log)
    fig = go.Figure(
        go.Heatmap(
            z=colour,
            x=xs,
            y=ys,
            customdata=m if log else None,
            colorscale="Blues",
            hovertemplate="query %{y}<br>key %{x}<br>share of row %{"
            + ("customdata" if log else "z")
            + ":.4g}<extra></extra>",
            **scale,
        )
    )
    head_label = f"L{layer}H{head}"
    meaning = "colour: share of the query's attention" + (
        " (block: mean over queries, sum over keys)" if blocks else ""
    )
    meaning += ", log scale" if log else ""
    fig.update_layout(
        title={
            "text": title
            or f"{head_label} attention — {plain(model)} ({n} tokens, queries {start}-{stop - 1}{shown})"
            f"<br><sup>{meaning}</sup>",
            "x": 0.01,
        },
        xaxis={"title": "key", "tickangle": -90, "type": "category", **token_ticks(bk, tokens, xs, 0, MAX_X_TICKS)},
        yaxis={
            "title": "query",
            "autorange": "reversed",
            "type": "category",
            **token_ticks(bq, tokens, ys, start, max(4, (height - 200) // TICK_PX)),
        },
        margin={"l": 60, "r": 20, "t": 70, "b": 60},
        height=height,
        meta={"layer": int(layer), "head": int(head), "head_label": head_label, "n_tokens": int(n), "log": bool(log)},
    )
    return fig


LOG_FLOOR = -5.0  # log colour scales start at 1e-5 of a row


def _colour(m: np.ndarray, log: bool) -> tuple[np.ndarray, dict]:
    """The colour values and scale of a share-of-row matrix: linear from 0, or log10 from ``LOG_FLOOR``."""
    if not log:
        return m, {"zmin": 0, "colorbar": {"title": "share of row"}}
    z = np.log10(np.clip(m, 10.0**LOG_FLOOR, None))
    ticks = list(range(int(LOG_FLOOR), 1))
    return z, {
        "zmin": LOG_FLOOR,
        "zmax": 0.0,
        "colorbar": {
            "title": "share of row (log)",
            "tickvals": ticks,
            "ticktext": [f"1e{t}" if t else "1" for t in ticks],
        },
    }


def mark_head(fig: go.Figure, selected) -> go.Figure:
    """Outline the selected head's cell on a head map (``{"layer": l, "head": h}``; None leaves the map as is)."""
    if not selected or "layer" not in selected:
        return fig
    l, h = int(selected["layer"]), int(selected["head"])
    fig.add_shape(
        type="rect",
        x0=h - 0.5,
        x1=h + 0.5,
        y0=l - 0.5,
        y1=l + 0.5,
        line={"color": "#e8590c", "width": 3},
        fillcolor="rgba(0,0,0,0)",
    )
    fig.update_layout(meta={**(fig.layout.meta or {}), "selected": f"L{l}H{h}"})
    return fig


def head_map_difference(
    scores_a, scores_b, labels: tuple[str, str] = ("A", "B"), title: str | None = None
) -> go.Figure:
    """Layers x heads heatmap of ``scores_a - scores_b`` (two ``HeadScores`` of the same grid, e.g. the same probe
    in two runs); a diverging colour scale centred on 0, hover shows both scores and the difference.

    Parameters
    ----------
    scores_a, scores_b : HeadScores with the same (layers, heads) grid
    labels : names of the two sides (run names in the app), used in the title and hover

    Axis labels are those of ``head_map`` (``L3`` / ``H7``), so a click selects a head the same way. The figure's
    ``layout.meta`` holds ``kind="difference"``, the labels and the largest absolute difference.
    """
    a, b = np.asarray(scores_a.scores, dtype=np.float64), np.asarray(scores_b.scores, dtype=np.float64)
    labels = (plain(labels[0]), plain(labels[1]))
    if a.shape != b.shape:
        raise ValueError(f"cannot compare head grids of shapes {a.shape} and {b.shape} (different models?)")
    diff = a - b
    finite = np.isfinite(diff)
    span = float(np.abs(diff[finite]).max()) if finite.any() else 0.0
    fig = go.Figure(
        go.Heatmap(
            z=diff,
            x=[f"H{h}" for h in range(a.shape[1])],
            y=[f"L{l}" for l in range(a.shape[0])],
            customdata=np.stack([a, b], axis=-1),
            colorscale="RdBu",
            reversescale=True,  # red = higher in A
            zmid=0.0,
            hovertemplate=(
                f"%{{y}}%{{x}}<br>{labels[0]} %{{customdata[0]:.4f}}<br>{labels[1]} %{{customdata[1]:.4f}}"
                "<br>difference %{z:.4f}<extra></extra>"
            ),
            colorbar={"title": "A − B"},
        )
    )
    name = scores_a.name if scores_a.name == scores_b.name else f"{scores_a.name} vs {scores_b.name}"
    name = plain(name)
    fig.update_layout(
        title=title or f"{name}: {labels[0]} − {labels[1]}",
        xaxis_title="head",
        yaxis_title="layer",
        yaxis={"autorange": "reversed"},
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        meta={"kind": "difference", "labels": list(labels), "max_abs_difference": span},
    )
    return fig


def query_row_strip(
    weights,
    tokens,
    *,
    query: int,
    layer: int,
    head: int,
    model: str = "",
    max_tokens: int = 256,
    title: str | None = None,
) -> go.Figure:
    """One query's attention over the keys as a token strip (1 x keys heatmap with token labels).

    Parameters
    ----------
    weights : array of shape (n_tokens, n_tokens), post-softmax attention of head ``(layer, head)``
    tokens : list of str, the prompt's tokens
    query : int, the query position (negative counts from the end, like Python indexing)
    max_tokens : int, default=256
        Most keys drawn; longer spans are summed in blocks (the row keeps its attention mass, see
        ``downsample_pattern``).

    Keys run from 0 to the last one with non-zero weight or the query, whichever is later (a causal row ends at
    its query; a bidirectional one spans the prompt). ``layout.meta`` holds ``layer``, ``head``, ``head_label``,
    ``query`` and ``n_tokens``.
    """
    w = np.asarray(weights, dtype=np.float32)
    n = w.shape[0]
    q = int(query) + (n if int(query) < 0 else 0)
    if not 0 <= q < n:
        raise ValueError(f"query {query} is outside a prompt of {n} tokens")
    row = w[q]
    nonzero = np.flatnonzero(row)
    stop = max(q, int(nonzero[-1]) if len(nonzero) else 0) + 1
    m, _, bk = downsample_pattern(row[None, :stop], max_size=max_tokens)
    head_label = f"L{layer}H{head}"
    qtok = str(tokens[q]) if q < len(tokens) else ""
    qlabel = plain(qtok)
    shown = "" if m.shape[1] == stop else f", shown as {m.shape[1]} key blocks"
    xs = block_labels(bk, tokens, 0)
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=xs,
            y=[f"{q}:{qlabel}"],
            colorscale="Blues",
            zmin=0,
            hovertemplate="query %{y}<br>key %{x}<br>share of row %{z:.4f}<extra></extra>",
            colorbar={"title": "share of row"},
        )
    )
    fig.update_layout(
        title=title
        or f"{head_label} attention of query {q} ({plain(repr(qtok))}) — {plain(model)} ({n} tokens{shown})",
        xaxis={"title": "key", "tickangle": -90, "type": "category", **token_ticks(bk, tokens, xs, 0, MAX_X_TICKS)},
        yaxis={"title": "query", "type": "category"},
        margin={"l": 120, "r": 20, "t": 50, "b": 120},
        height=320,
        meta={"layer": int(layer), "head": int(head), "head_label": head_label, "query": q, "n_tokens": int(n)},
    )
    return fig


def image_attention_overlay(
    image,
    grid,
    *,
    opacity: float = 0.55,
    colorscale: str = "Hot",
    title: str | None = None,
    layer: int | None = None,
    head: int | None = None,
    min_total: float = 1e-4,
) -> go.Figure:
    """Attention over the image patch grid drawn on top of the image.

    Parameters
    ----------
    image : PIL image or array ``[H, W, 3]`` (uint8), the image the model saw
    grid : array ``[grid_h, grid_w]``, e.g. from ``attnlab.probes.image_centric_heads.image_attention_grid``;
        cell (r, c) covers the image's patch in row r, column c.
    opacity : float, default=0.55, of the heat map over the image
    min_total : float, default=1e-4
        Below this attention mass on the image the head is drawn as paying it no attention: the image alone,
        titled so, with ``layout.meta["no_attention"]`` True (a colour scale over ~1e-21 would show noise as heat).
    ``layout.meta`` holds ``grid_shape``, ``total`` (attention mass on the image) and the head, when given.
    """
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"grid must be 2-D (grid_h, grid_w), got shape {g.shape}")
    h, w = img.shape[:2]
    dy, dx = h / g.shape[0], w / g.shape[1]
    head_label = f"L{layer}H{head}" if layer is not None and head is not None else ""
    fig = go.Figure(go.Image(z=img, hoverinfo="skip"))
    total = float(g.sum())
    layout = {
        "xaxis": {"visible": False, "range": [0, w]},
        "yaxis": {"visible": False, "range": [h, 0], "scaleanchor": "x"},
        "margin": {"l": 20, "r": 20, "t": 50, "b": 20},
    }
    if not total >= min_total:  # a colour scale stretched over rounding noise would draw it as a hot patch
        fig.update_layout(
            title=title or f"{head_label or 'this head'}: no attention on the image (sum {total:.2g})",
            meta={
                "grid_shape": list(g.shape),
                "total": total,
                "layer": layer,
                "head": head,
                "no_attention": True,
            },
            **layout,
        )
        return fig
    fig.add_trace(
        go.Heatmap(
            z=g,
            x0=dx / 2,
            dx=dx,
            y0=dy / 2,
            dy=dy,
            opacity=opacity,
            colorscale=colorscale,
            zmin=0,
            hovertemplate="patch row %{y:.0f}, col %{x:.0f}<br>attention %{z:.4f}<extra></extra>",
            colorbar={"title": "attention"},
        )
    )
    fig.update_layout(
        title=title or f"{head_label} attention over the image patches (sum {total:.3f})".strip(),
        meta={"grid_shape": list(g.shape), "total": total, "layer": layer, "head": head, "no_attention": False},
        **layout,
    )
    return fig


def ablation_bars(table, title: str | None = None) -> go.Figure:
    """The drop of a metric when a head set is ablated, beside k random heads (bars with error bars).

    Parameters
    ----------
    table : DataFrame from ``attnlab.ablation.causal_test.causal_test`` (rows baseline / top_k / random; columns
        metric, ci_low, ci_high, drop, p_value, k, n_sets, heads). ``table.attrs`` may hold ``random_values``,
        ``metric`` (its name) and ``source``.

    Bars: drop = baseline - ablated metric for the head set and for the random sets' mean; the random bar's error
    bar is its bootstrap confidence interval (of the mean, mapped to drops); the single random sets are dots.
    ``layout.meta`` holds ``baseline``, ``top_drop``, ``random_drop``, ``random_ci`` (drop interval), ``p_value``,
    ``k`` and ``n_seeds``.
    """
    rows = {r["condition"]: r for r in table.to_dict(orient="records")}
    missing = {"baseline", "top_k", "random"} - set(rows)
    if missing:
        raise ValueError(f"not a causal-test table: no {', '.join(sorted(missing))} row")
    base, top, rnd = (float(rows[c]["metric"]) for c in ("baseline", "top_k", "random"))
    top_drop, rnd_drop = base - top, base - rnd
    ci = (base - float(rows["random"]["ci_high"]), base - float(rows["random"]["ci_low"]))  # drop interval
    k, n_seeds, p = int(rows["top_k"]["k"]), int(rows["random"]["n_sets"]), float(rows["top_k"]["p_value"])
    heads = str(rows["top_k"]["heads"])
    labels = [f"ablated: {heads}" if len(heads) <= 40 else f"top-{k} heads", f"{k} random heads (mean of {n_seeds})"]
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=[top_drop, rnd_drop],
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [0.0, max(0.0, ci[1] - rnd_drop)],
                "arrayminus": [0.0, max(0.0, rnd_drop - ci[0])],
            },
            marker_color=["#c0392b", "#7f8c8d"],
            customdata=[[top, heads], [rnd, f"CI of drop {ci[0]:.4f} to {ci[1]:.4f}"]],
            hovertemplate=(
                "%{x}<br>drop %{y:.4f}<br>ablated metric %{customdata[0]:.4f}<br>%{customdata[1]}<extra></extra>"
            ),
            name="drop",
        )
    )
    values = [float(v) for v in table.attrs.get("random_values", [])]
    if values:
        fig.add_trace(
            go.Scatter(
                x=[labels[1]] * len(values),
                y=[base - v for v in values],
                mode="markers",
                marker={"color": "#2c3e50", "size": 7},
                name="random sets",
                hovertemplate="random set<br>drop %{y:.4f}<extra></extra>",
            )
        )
    metric = table.attrs.get("metric", "metric")
    fig.update_layout(
        title=title or f"drop of {metric} (baseline {base:.4f}); p = {p:.3f}",
        yaxis_title=f"drop of {metric}",
        showlegend=False,
        margin={"l": 60, "r": 20, "t": 50, "b": 60},
        height=380,
        meta={
            "baseline": base,
            "top_drop": top_drop,
            "random_drop": rnd_drop,
            "random_ci": list(ci),
            "p_value": p,
            "k": k,
            "n_seeds": n_seeds,
        },
    )
    return fig


def attention_difference(
    baseline,
    intervened,
    tokens,
    *,
    layer: int,
    head: int,
    model: str = "",
    method: str = "",
    max_size: int = 192,
    title: str | None = None,
) -> go.Figure:
    """Query x key heatmap of ``intervened - baseline`` attention of one head (diverging colours centred on 0).

    Parameters
    ----------
    baseline, intervened : arrays of shape (n_tokens, n_tokens), post-softmax attention of head ``(layer, head)``
        on the same prompt without and with an intervention (``ComparisonResult.plot()`` passes them).
    tokens : list of str, the prompt's tokens (labels)
    max_size : int, default=192
        Most rows/columns drawn; longer prompts are block-downsampled like ``attention_pattern`` (query blocks
        averaged, key blocks summed; linear, so it is the difference of the downsampled patterns).

    Red = more attention with the intervention. Hover shows both weights and the difference. ``layout.meta``
    holds ``kind="attention_difference"``, ``layer``, ``head``, ``head_label``, ``n_tokens``, ``method`` and
    ``max_abs_difference`` (of the full-resolution difference).
    """
    a, b = np.asarray(baseline, dtype=np.float32), np.asarray(intervened, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"baseline and intervened patterns must be equal 2-D shapes, got {a.shape} and {b.shape}")
    n = a.shape[0]
    full = b - a
    span = float(np.abs(full).max()) if full.size else 0.0
    d, bq, bk = downsample_pattern(full, max_size=max_size)
    ma, _, _ = downsample_pattern(a, max_size=max_size)
    mb, _, _ = downsample_pattern(b, max_size=max_size)
    shown = "" if d.shape == full.shape else f", shown as {d.shape[0]}x{d.shape[1]} blocks"
    head_label = f"L{layer}H{head}"
    fig = go.Figure(
        go.Heatmap(
            z=d,
            x=block_labels(bk, tokens, 0),
            y=block_labels(bq, tokens, 0),
            customdata=np.stack([ma, mb], axis=-1),
            colorscale="RdBu",
            reversescale=True,  # red = more attention with the intervention
            zmid=0.0,
            hovertemplate=(
                "query %{y}<br>key %{x}<br>baseline %{customdata[0]:.4f}<br>intervened %{customdata[1]:.4f}"
                "<br>difference %{z:.4f}<extra></extra>"
            ),
            colorbar={"title": "Δ attention"},
        )
    )
    fig.update_layout(
        title=title
        or (
            f"{head_label} attention, {plain(method or 'intervened')} − baseline — {plain(model)} "
            f"({n} tokens{shown}; max |Δ| {span:.4f})"
        ),
        xaxis={"title": "key", "tickangle": -60, "type": "category"},
        yaxis={"title": "query", "autorange": "reversed", "type": "category"},
        margin={"l": 120, "r": 20, "t": 50, "b": 120},
        meta={
            "kind": "attention_difference",
            "layer": int(layer),
            "head": int(head),
            "head_label": head_label,
            "n_tokens": int(n),
            "method": method,
            "max_abs_difference": span,
        },
    )
    return fig


def census_scatter(frame, x: str, y: str, title: str | None = None) -> go.Figure:
    """Every head of a census as a point on statistics ``x`` and ``y``, coloured by layer; the hover names the head
    and lists all its statistics. ``frame`` is ``Census.to_frame()`` (columns layer, head, label, statistics)."""
    stats = [c for c in frame.columns if c not in ("layer", "head", "label")]
    hover = [
        "<br>".join([f"<b>{row['label']}</b>"] + [f"{s}: {row[s]:.4g}" for s in stats if np.isfinite(row[s])])
        for _, row in frame.iterrows()
    ]
    fig = go.Figure(
        go.Scatter(
            x=frame[x],
            y=frame[y],
            mode="markers",
            marker={
                "color": frame["layer"],
                "colorscale": "Viridis",
                "size": 8,
                "colorbar": {"title": "layer"},
                "line": {"width": 0.5, "color": "#333"},
            },
            text=hover,
            customdata=np.stack([frame["layer"], frame["head"]], axis=1),
            hovertemplate="%{text}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or f"{y} vs {x}",
        xaxis_title=x,
        yaxis_title=y,
        height=560,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        template="plotly_white",
    )
    return fig


def head_examples(examples, *, layer: int, head: int, model: str = "", max_size: int = 64) -> go.Figure:
    """One head's attention on several prompts side by side (its top examples in a census).

    Parameters
    ----------
    examples : list of (weights [n, n], tokens, caption) — the head's post-softmax pattern on each prompt
    max_size : most rows/columns drawn per prompt (longer prompts are block-downsampled, rows keep their mass)

    Colour is the share of the query's attention (one scale, 0 to 1, for all panels). ``layout.meta`` holds the
    head, ``n_examples`` and the captions.
    """
    from plotly.subplots import make_subplots

    n = max(1, len(examples))
    fig = make_subplots(rows=1, cols=n, subplot_titles=[c for _, _, c in examples] or [""], horizontal_spacing=0.06)
    for i, (weights, tokens, _) in enumerate(examples):
        w = np.asarray(weights, dtype=np.float32)
        m, bq, bk = downsample_pattern(w, max_size=max_size)
        fig.add_trace(
            go.Heatmap(
                z=m,
                x=block_labels(bk, tokens, 0, max_chars=40),
                y=block_labels(bq, tokens, 0, max_chars=40),
                coloraxis="coloraxis",
                hovertemplate="query %{y}<br>key %{x}<br>share of row %{z:.4f}<extra></extra>",
            ),
            row=1,
            col=i + 1,
        )
        fig.update_xaxes(type="category", showticklabels=False, title_text="key", row=1, col=i + 1)
        fig.update_yaxes(type="category", autorange="reversed", showticklabels=False, row=1, col=i + 1)
    fig.update_yaxes(title_text="query", row=1, col=1)
    label = f"L{layer}H{head}"
    fig.update_layout(
        title=f"{label} on its top examples — {model}<br><sup>colour: share of the query's attention</sup>",
        coloraxis={"colorscale": "Blues", "cmin": 0, "cmax": 1, "colorbar": {"title": "share of row"}},
        height=420,
        margin={"l": 50, "r": 20, "t": 90, "b": 40},
        meta={"layer": int(layer), "head": int(head), "head_label": label, "n_examples": len(examples)},
    )
    return fig
