"""Building blocks of the page shared by the views: cards, graphs that hide while empty (with a one-line hint),
labels, AG Grid tables."""

from __future__ import annotations

import dash_ag_grid as dag
import dash_mantine_components as dmc
from dash import dcc, html

from attnlab.apps import ids
from attnlab.apps.state import GRAPH_HEIGHTS

STATUS = {"color": "var(--mantine-color-red-6)", "minHeight": "1.2em", "fontSize": "90%"}
NOTE = {"fontSize": "85%", "color": "var(--mantine-color-dimmed)", "marginBottom": "4px"}
ROW = {"display": "flex", "flexWrap": "wrap", "alignItems": "center", "gap": "6px 10px"}
# Graphs that are hidden while they have nothing to draw; the line under them says what to do instead
# (``callbacks.shell`` shows the message an empty figure carries, or this default before any figure arrived).
GRAPH_HINTS: dict[str, str] = {
    ids.HEAD_MAP: "pick a run with head scores in the left panel",
    ids.PATTERN: "select a head: click the head map, or use the arrow keys",
    ids.TOKEN_STRIP: "this run has no token scores: scan with a token probe (e.g. act_sinks) to see them here",
    ids.TOKENS_HEAD: "select a head to see its attention from the prompt's last token",
    ids.VISION_FIGURE: "pick a vision-language run",
    ids.GRID_FIGURE: "select a head: its layer's heads are drawn here",
    ids.CMP_FIGURE: "type prompt B and press 'compare'",
    ids.DLA_FIGURE: "type the answer and press 'attribute'",
    ids.IV_FIGURE: "pick a method, type a prompt and press 'run intervention'",
    ids.ABL_FIGURE: "choose the heads and the metric, then press 'run ablation'",
    ids.CENSUS_FIGURE: "",
    ids.CENSUS_OTHER: "pick a second census run under 'compare with' to see it side by side",
    ids.CENSUS_EXAMPLES: "click a head in the scatter to see its pattern on its top examples",
}
GRAPH_STYLE: dict[str, dict] = {gid: {"height": f"{h}px"} for gid, h in GRAPH_HEIGHTS.items()}


def graph(graph_id: str, **kwargs) -> list:
    """A graph (hidden while empty) and its one-line hint."""
    return [
        dcc.Graph(id=graph_id, config={"displaylogo": False}, style=GRAPH_STYLE.get(graph_id, {}), **kwargs),
        html.Div(GRAPH_HINTS.get(graph_id, ""), id=f"{graph_id}-hint", className="attnlab-hint"),
    ]


def card(title: str, view_id: str, children: list, *, note: str | None = None) -> dmc.Paper:
    head = [dmc.Title(title, order=4, mb=4)]
    if note:
        head.append(html.Div(note, style=NOTE))
    return dmc.Paper(head + children, id=view_id, withBorder=True, radius="md", p="md", mb="md")


def label(text: str) -> html.Span:
    return html.Span(text, className="attnlab-label")


def inline(width: str) -> dict:
    return {"width": width, "display": "inline-block", "verticalAlign": "middle"}


def grid(grid_id: str, rows: list[dict], columns: list[str], *, height: int | None = 300, **kwargs) -> dag.AgGrid:
    """A sortable, filterable AG Grid of ``rows`` (one dict per row); a row click selects the row
    (``selectedRows``). ``height=None``: as tall as its rows (small tables)."""
    options = {
        "animateRows": False,
        "rowSelection": {"mode": "singleRow", "checkboxes": False, "enableClickSelection": True},
    }
    if height is None:
        options["domLayout"] = "autoHeight"
    return dag.AgGrid(
        id=grid_id,
        rowData=rows,
        columnDefs=[{"field": c, "headerName": c} for c in columns],
        defaultColDef={"sortable": True, "filter": True, "resizable": True, "minWidth": 90},
        columnSize="responsiveSizeToFit",
        dashGridOptions=options,
        style={"width": "100%"} if height is None else {"height": f"{height}px", "width": "100%"},
        className="attnlab-grid",
        **kwargs,
    )
