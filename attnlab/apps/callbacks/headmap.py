"""Head map view: a probe's layers x heads heatmap (``figures.head_map``), or its difference between two runs
(``figures.head_map_difference``); a click selects a head."""

from __future__ import annotations

import re

from dash import Input, Output, State, ctx

from attnlab.apps import figures, ids
from attnlab.apps.state import AppState, empty_figure, failure_message
from attnlab.errors import AttnlabError

_AXIS = re.compile(r"^[LH](\d{1,4})$")


def head_figure(run_name, result_name, state: AppState, compare=None) -> tuple:
    """-> (figure, status message). With a second run ``compare`` (not the same run), the map is the difference
    ``run - compare`` of the same-named head scores (``figures.head_map_difference``)."""
    if run_name is None or result_name is None:
        return empty_figure("no head scores in this run"), ""
    try:
        scores = state.catalog.result(run_name, result_name, "head_scores")
        check_grid(scores)
        if compare is None or compare == run_name:
            return figures.head_map(scores), ""
        state.catalog.open(compare)  # a name that is not a run is refused before its results are looked up
        other = state.catalog.result(compare, result_name, "head_scores")
        check_grid(other)
        return figures.head_map_difference(scores, other, labels=(run_name, compare)), ""
    except Exception as e:
        return empty_figure(), failure_message(e)


MAX_GRID_CELLS = 128 * 256  # layers x heads drawn at most (the largest public models have about 16k heads)


def check_grid(scores) -> None:
    """Refuse (a one-line message in the view) a score grid too large to send to the page."""
    cells = scores.n_layers * scores.n_heads
    if cells > MAX_GRID_CELLS:
        raise AttnlabError(
            f"{scores.name} has a {scores.n_layers} x {scores.n_heads} grid ({cells:,} heads), more than the head map "
            f"draws ({MAX_GRID_CELLS:,}); read it with `attnlab show --result {scores.name}` or HeadScores.top()"
        )


def head_from_click(click_data) -> tuple[int, int] | None:
    """(layer, head) of a click on the head map (axis labels ``L3`` / ``H7``), or None if it is not one."""
    try:
        point = click_data["points"][0]
        y, x = _AXIS.match(str(point["y"])), _AXIS.match(str(point["x"]))
    except (TypeError, KeyError, IndexError):
        return None
    if not (x and y and str(point["y"]).startswith("L") and str(point["x"]).startswith("H")):
        return None
    return int(y.group(1)), int(x.group(1))


def select_head(trigger, click_data, run_name, result_name, current, state: AppState) -> dict | None:
    """The selected head after an event: a click selects the clicked head (if it exists in the run's grid); a new
    run selects its score's strongest head (a head of another run may not exist here, and means nothing here
    when it does); a new score keeps the selection if it is in the grid, else selects its strongest head;
    anything invalid keeps the current selection (or none, after a run switch)."""
    try:
        scores = state.catalog.result(run_name, result_name, "head_scores")
    except Exception:
        return None if trigger == ids.RUN_SELECT else current
    if trigger == ids.RUN_SELECT:
        current = None
    if trigger == ids.HEAD_MAP:
        head = head_from_click(click_data)
        if head is None or not (0 <= head[0] < scores.n_layers and 0 <= head[1] < scores.n_heads):
            return current
        return {"layer": head[0], "head": head[1]}
    if current and 0 <= current.get("layer", -1) < scores.n_layers and 0 <= current.get("head", -1) < scores.n_heads:
        return current
    top = scores.top_heads(1)
    return {"layer": top[0][0], "head": top[0][1]} if top else None


def _trigger() -> str | None:
    """The id that fired: the run selector when it is among the triggers (a run switch also changes the score
    list, and Dash fires once for both), else the first trigger."""
    fired = [str(t.get("prop_id", "")).split(".")[0] for t in ctx.triggered or []]
    return ids.RUN_SELECT if ids.RUN_SELECT in fired else ctx.triggered_id


def head_label(selected) -> str:
    if not selected:
        return "no head selected (click a cell)"
    return f"selected head: L{selected['layer']}H{selected['head']}"


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.HEAD_MAP, "figure"),
        Output(ids.HEAD_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.HEAD_RESULT, "value"),
        Input(ids.COMPARE_SELECT, "value"),
    )(lambda run_name, result_name, compare: head_figure(run_name, result_name, state, compare))
    app.callback(
        Output(ids.SELECTED_HEAD, "data"),
        Input(ids.HEAD_MAP, "clickData"),
        Input(ids.HEAD_RESULT, "value"),
        Input(ids.RUN_SELECT, "value"),
        State(ids.SELECTED_HEAD, "data"),
    )(
        lambda click, result_name, run_name, current: select_head(
            _trigger(), click, run_name, result_name, current, state
        )
    )
    app.callback(Output(ids.HEAD_LABEL, "children"), Input(ids.SELECTED_HEAD, "data"))(head_label)
