"""What the app's callbacks share: the run catalog, the live-model runner, display limits, and failure messages."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import plotly.graph_objects as go

from attnlab.apps import ids
from attnlab.apps.catalog import RunCatalog
from attnlab.apps.live import LiveModels
from attnlab.errors import AttnlabError


@dataclass
class AppState:
    """Built once by ``create_app``; handed to every ``register(app, state)``."""

    catalog: RunCatalog
    live: LiveModels = field(default_factory=LiveModels)
    max_pattern_size: int = 192


_ABS_PATH = re.compile(r"""(?<![\w.:/])(?:/[^\s'"/:,;()]+)+/?""")


def no_paths(text: str) -> str:
    """``text`` with every absolute path shortened to its last component: the page shows names, never where
    files live on the server."""
    return _ABS_PATH.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or "/", text)


def failure_message(exc: BaseException) -> str:
    """One line for the page: the message of a user error, the type and first line of anything else (no traceback,
    no server paths)."""
    if isinstance(exc, (AttnlabError, KeyError, ValueError)):
        text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        return no_paths(text.strip().splitlines()[0]) if text.strip() else type(exc).__name__
    first = (str(exc).strip().splitlines() or [""])[0]
    return no_paths(f"internal error: {type(exc).__name__}: {first}")


# Heights (px) of the graphs that sit in a fixed box. Every figure such a graph shows states its height: plotly.js
# keeps the last explicit height for a later figure that gives none, so one short figure (an error, a one-row strip)
# would otherwise squash every pattern drawn after it until the page is reloaded.
GRAPH_HEIGHTS = {ids.PATTERN: 650, ids.VISION_FIGURE: 520, ids.IV_FIGURE: 600}


def sized(fig: go.Figure, graph_id: str) -> go.Figure:
    """``fig`` with the height of graph ``graph_id``'s box unless it states its own (``GRAPH_HEIGHTS``)."""
    if fig.layout.height is None and graph_id in GRAPH_HEIGHTS:
        fig.update_layout(height=GRAPH_HEIGHTS[graph_id])
    return fig


def figure_height(graph_id: str):
    """Decorator for a callback function whose first return value is the figure of graph ``graph_id``: that
    figure gets the graph's height (``sized``) on every path, errors included."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            out = fn(*args, **kwargs)
            return (sized(out[0], graph_id), *out[1:])

        return inner

    return wrap


def empty_figure(message: str = "") -> go.Figure:
    """A blank figure carrying a message (shown where a view has nothing to draw). It states no height: it fills
    whatever box it is drawn in, and leaves nothing for the next figure to inherit."""
    fig = go.Figure()
    fig.update_layout(xaxis={"visible": False}, yaxis={"visible": False}, margin={"l": 20, "r": 20, "t": 30, "b": 20})
    if message:
        fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    return fig
