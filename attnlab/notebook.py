"""What attnlab objects look like in a notebook: short reprs, small self-contained HTML views, and figures that
survive a static export.

Plotly's default renderer in a Jupyter kernel is ``plotly_mimetype``: JupyterLab draws it through its extension,
but ``jupyter nbconvert --to html`` (and GitHub, and any viewer without the extension) shows a blank output.
``use_embedding_renderer`` switches that default, once, to ``plotly_mimetype+notebook``: JupyterLab still draws
the mimetype, and every figure is also written as HTML, with plotly.js embedded once in the notebook, so a static
export shows it, offline. A renderer chosen by the user (``PLOTLY_RENDERER`` or ``plotly.io.renderers.default``)
is left alone. ``import attnlab`` calls it on first use inside a Jupyter kernel.

JupyterLab may offer to build ``@plotly/dash-jupyterlab``: Dash (the app's server) ships that extension as source.
attnlab does not need it (the app runs in its own browser tab); ``jupyter labextension disable
@plotly/dash-jupyterlab`` (the Dash maintainers' workaround) stops the prompt.
"""

from __future__ import annotations

import html
import os
import sys
from typing import Any

_DONE = [False]
EMBEDDING_RENDERER = "plotly_mimetype+notebook"


def in_jupyter_kernel() -> bool:
    """Whether this process is a Jupyter (ipykernel) kernel."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def use_embedding_renderer(*, force: bool = False) -> str | None:
    """Make plotly figures self-contained HTML in notebook outputs (see the module docstring); returns the renderer
    now in use, or None outside a Jupyter kernel. ``force``: switch even if the renderer is not plotly's default."""
    if not (force or in_jupyter_kernel()):
        return None
    import plotly.io as pio

    if force or (not os.environ.get("PLOTLY_RENDERER") and pio.renderers.default == "plotly_mimetype"):
        pio.renderers.default = EMBEDDING_RENDERER
    _DONE[0] = True
    return pio.renderers.default


def setup_once() -> None:
    """``use_embedding_renderer`` the first time attnlab is used in a kernel (cheap afterwards)."""
    if not _DONE[0] and in_jupyter_kernel():
        use_embedding_renderer()
    _DONE[0] = True


# ---- small HTML pieces (no JavaScript: they survive any export) -------------------------------------------------


def html_escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


_TABLE = "border-collapse:collapse;font-size:90%;margin:4px 0"
_CELL = "padding:1px 8px;border-bottom:1px solid #eee;text-align:left"


def table_html(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain HTML table of ``rows`` (dicts), values escaped."""
    if not rows:
        return ""
    columns = columns or list(rows[0])
    head = "".join(f"<th style='{_CELL}'>{html_escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td style='{_CELL}'>{_fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table style='{_TABLE}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html_escape(v)


def _colour(value: float, lo: float, hi: float, signed: bool) -> str:
    """A background colour for a value: white to blue, or blue-white-red around 0 when ``signed``."""
    import math

    if value is None or not math.isfinite(value):
        return "#f4f4f4"
    if signed:
        span = max(abs(lo), abs(hi)) or 1.0
        t = max(-1.0, min(1.0, value / span))
        r, g, b = (
            (255, int(255 * (1 - t)), int(255 * (1 - t))) if t > 0 else (int(255 * (1 + t)), int(255 * (1 + t)), 255)
        )
        return f"rgb({r},{g},{b})"
    t = 0.0 if hi <= lo else (value - lo) / (hi - lo)
    return f"rgb({int(255 - 200 * t)},{int(255 - 140 * t)},255)"


def grid_html(grid, *, signed: bool = False, cell: int = 14, title: str = "") -> str:
    """A layers x heads grid as coloured cells (hover: head and value); NaN cells grey."""
    import numpy as np

    g = np.asarray(grid, dtype=float)
    finite = g[np.isfinite(g)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    rows = []
    for l in range(g.shape[0]):
        cells = "".join(
            f"<td title='L{l}H{h}: {g[l, h]:.4g}' style='width:{cell}px;height:{cell}px;padding:0;"
            f"background:{_colour(float(g[l, h]), lo, hi, signed)}'></td>"
            for h in range(g.shape[1])
        )
        rows.append(f"<tr><td style='font-size:70%;padding:0 4px 0 0'>L{l}</td>{cells}</tr>")
    cap = f"<div style='font-size:80%;color:#555'>{html_escape(title)}</div>" if title else ""
    return f"{cap}<table style='border-collapse:collapse'>{''.join(rows)}</table>"


def head_table_html(frame, *, signed: bool = False) -> str:
    """A ``top(k)`` frame (label, score, ...) as a table."""
    cols = [c for c in ("label", "score", "rank") if c in frame.columns]
    return table_html(frame[cols].to_dict(orient="records"), cols)


def tokens_html(tokens, values, marks: dict[str, list[int]] | None = None, *, limit: int = 600) -> str:
    """Tokens coloured by value (white to orange over the finite range), marked tokens outlined, hover gives the
    position and value; at most ``limit`` tokens (the rest counted)."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    marked = {p: m for m, ps in (marks or {}).items() for p in ps}
    spans = []
    for i, tok in enumerate(tokens[:limit]):
        t = 0.0 if not np.isfinite(v[i]) or hi <= lo else (v[i] - lo) / (hi - lo)
        bg = f"rgba(255,140,0,{0.08 + 0.85 * t:.2f})"
        border = "outline:2px solid #c0392b;" if i in marked else ""
        tip = f"{i}: {v[i]:.4g}" + (f" ({marked[i]})" if i in marked else "")
        spans.append(
            f"<span title='{html_escape(tip)}' style='background:{bg};{border}white-space:pre;"
            f"font-family:monospace;margin:0 1px'>{html_escape(tok)}</span>"
        )
    more = f" <i>… {len(tokens) - limit} more tokens</i>" if len(tokens) > limit else ""
    return f"<div style='line-height:1.9;max-width:100%'>{''.join(spans)}{more}</div>"


def figure_bundle(fig, text: str) -> dict[str, Any]:
    """A display bundle of a plotly figure (as the active renderer writes it) with ``text`` as its plain-text form."""
    setup_once()
    bundle = dict(fig._repr_mimebundle_())
    bundle["text/plain"] = text
    return bundle


__all__ = [
    "EMBEDDING_RENDERER",
    "figure_bundle",
    "grid_html",
    "head_table_html",
    "html_escape",
    "in_jupyter_kernel",
    "table_html",
    "tokens_html",
    "use_embedding_renderer",
]
