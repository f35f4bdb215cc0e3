"""Head map view: a probe's layers x heads heatmap (``figures.head_map``), or its difference between two runs
(``figures.head_map_difference``); a click selects a head."""

from __future__ import annotations

import re

from dash import Input, Output, State, ctx, no_update

from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.state import AppState, empty_figure, failure_message
from attnlab.errors import AttnlabError

_AXIS = re.compile(r"^[LH](\d{1,4})$")
_HEAD = re.compile(r"^L(\d{1,4})H(\d{1,4})$")
STEPS = ("head+1", "head-1", "layer+1", "layer-1")
BUTTONS = {ids.HEAD_NEXT: "head+1", ids.HEAD_PREV: "head-1", ids.LAYER_NEXT: "layer+1", ids.LAYER_PREV: "layer-1"}


def head_figure(run_name, result_name, state: AppState, compare=None, selected=None) -> tuple:
    """-> (figure, status message). With a second run ``compare`` (not the same run), the map is the difference
    ``run - compare`` of the same-named head scores (``figures.head_map_difference``). The ``selected`` head is
    outlined (``figures.mark_head``)."""
    if run_name is None or result_name is None:
        return empty_figure("this run has no head scores: pick another run, or scan with a head probe"), ""
    try:
        scores = state.catalog.result(run_name, result_name, "head_scores")
        check_grid(scores)
        if compare is None or compare == run_name:
            fig = figures.head_map(scores)
        else:
            state.catalog.open(compare)  # a name that is not a run is refused before its results are looked up
            other = state.catalog.result(compare, result_name, "head_scores")
            check_grid(other)
            fig = figures.head_map_difference(scores, other, labels=(run_name, compare))
        return figures.mark_head(fig, selected), ""
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


MAX_TOP_ROWS = 2000  # heads listed in the ranked table (the best ones; the map draws them all)


def top_rows(run_name, result_name, state: AppState) -> list[dict]:
    """Rows of the ranked-heads table: every head of the score with its value and rank (best first)."""
    try:
        scores = state.catalog.result(run_name, result_name, "head_scores")
    except Exception:
        return []
    df = scores.to_frame().dropna(subset=["rank"]).sort_values("rank").head(MAX_TOP_ROWS)
    return [
        {
            "head": r.label,
            "score": round(float(r.score), 6),
            "rank": int(r.rank),
            "layer": int(r.layer),
            "h": int(r.head),
        }
        for r in df.itertuples()
    ]


def step_head(current, step: str, n_layers: int, n_heads: int) -> dict | None:
    """The head after a key press: ``head+1`` / ``head-1`` move along the layer (on to the next / previous layer
    at its end), ``layer+1`` / ``layer-1`` keep the head index; the grid's edges stop the move. No selection
    starts at L0H0."""
    if n_layers <= 0 or n_heads <= 0 or step not in STEPS:
        return current
    if not current or "layer" not in current:
        return {"layer": 0, "head": 0}
    flat = int(current["layer"]) * n_heads + int(current["head"])
    if step in ("head+1", "head-1"):
        flat = min(max(0, flat + (1 if step == "head+1" else -1)), n_layers * n_heads - 1)
        return {"layer": flat // n_heads, "head": flat % n_heads}
    layer = min(max(0, int(current["layer"]) + (1 if step == "layer+1" else -1)), n_layers - 1)
    return {"layer": layer, "head": min(int(current["head"]), n_heads - 1)}


def parse_head(text) -> tuple[int, int] | None:
    """``"L3H7"`` -> (3, 7), anything else None."""
    m = _HEAD.match(str(text or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


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


def _grid_shape(run_name, result_name, state: AppState) -> tuple[int, int]:
    try:
        scores = state.catalog.result(run_name, result_name, "head_scores")
        return scores.n_layers, scores.n_heads
    except Exception:
        try:
            m = state.catalog.open(run_name).info.get("model", {})
            return int(m.get("n_layers") or 0), int(m.get("n_heads") or 0)
        except Exception:
            return 0, 0


def head_event(
    trigger, click, run_name, result_name, current, state: AppState, *, key=None, row=None, census=None, want=None
) -> tuple:
    """-> (selected head, URL_INIT data). The head the page's URL named, once (then the URL's request is spent);
    else a key or button step (``step_head``), a row of the ranked-heads table, a point of the census scatter, or
    what ``select_head`` does for clicks on the map, new scores and new runs."""
    if want and want.get("pending") and want.get("run") == run_name:
        head = parse_head(want.get("head"))
        n_layers, n_heads = _grid_shape(run_name, result_name, state)
        if head and 0 <= head[0] < n_layers and 0 <= head[1] < n_heads:
            return {"layer": head[0], "head": head[1]}, None
        return select_head(ids.RUN_SELECT, None, run_name, result_name, None, state), None
    step = BUTTONS.get(trigger) or (key.get("step") if trigger == ids.KEY_STEP and isinstance(key, dict) else None)
    if step:  # the page steps in the browser (assets/attnlab.js, ``step``); this serves a posted step the same way
        return step_head(current, step, *_grid_shape(run_name, result_name, state)), no_update
    picked = None
    if trigger == ids.TOP_HEADS and row:
        picked = (row[0].get("layer"), row[0].get("h"))
    elif trigger == ids.CENSUS_FIGURE and census:
        try:
            picked = tuple(int(v) for v in census["points"][0]["customdata"][:2])
        except (TypeError, KeyError, IndexError, ValueError):
            picked = None
    if picked is not None:
        n_layers, n_heads = _grid_shape(run_name, result_name, state)
        try:
            layer, head = int(picked[0]), int(picked[1])
        except (TypeError, ValueError):
            return current, no_update
        if 0 <= layer < n_layers and 0 <= head < n_heads:
            return {"layer": layer, "head": head}, no_update
        return current, no_update
    return select_head(trigger, click, run_name, result_name, current, state), no_update


def _changed(out: tuple, current) -> tuple:
    """``head_event``'s answer, with an unchanged head sent as no update: a late answer must not undo a step the
    browser made meanwhile (keys and step buttons move the head without the server)."""
    head, want = out
    return (no_update if head == current else head), want


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.HEAD_MAP, "figure"),
        Output(ids.HEAD_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.HEAD_RESULT, "value"),
        Input(ids.COMPARE_SELECT, "value"),
        Input(ids.SELECTED_HEAD, "data"),
    )(lambda run_name, result_name, compare, selected: head_figure(run_name, result_name, state, compare, selected))
    app.callback(Output(ids.TOP_HEADS, "rowData"), Input(ids.RUN_SELECT, "value"), Input(ids.HEAD_RESULT, "value"))(
        lambda run_name, result_name: top_rows(run_name, result_name, state)
    )
    app.callback(
        Output(ids.SELECTED_HEAD, "data"),
        Output(ids.URL_INIT, "data"),
        Input(ids.HEAD_MAP, "clickData"),
        Input(ids.HEAD_RESULT, "value"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.TOP_HEADS, "selectedRows"),
        Input(ids.CENSUS_FIGURE, "clickData"),
        State(ids.SELECTED_HEAD, "data"),
        State(ids.URL_INIT, "data"),
    )(
        lambda click, result_name, run_name, row, census, current, want: _changed(
            head_event(_trigger(), click, run_name, result_name, current, state, row=row, census=census, want=want),
            current,
        )
    )
    # keys and step buttons move the head in the browser: quick presses each apply to the head the last one chose
    app.callback(Output(ids.GRID_SHAPE, "data"), Input(ids.RUN_SELECT, "value"), Input(ids.HEAD_RESULT, "value"))(
        lambda run_name, result_name: list(_grid_shape(run_name, result_name, state))
    )
    app.clientside_callback(
        "function(key, n1, n2, n3, n4, current, shape) {"
        " return window.dash_clientside.attnlab.step(key, n1, n2, n3, n4, current, shape); }",
        Output(ids.SELECTED_HEAD, "data", allow_duplicate=True),
        Input(ids.KEY_STEP, "data"),
        Input(ids.HEAD_NEXT, "n_clicks"),
        Input(ids.HEAD_PREV, "n_clicks"),
        Input(ids.LAYER_NEXT, "n_clicks"),
        Input(ids.LAYER_PREV, "n_clicks"),
        State(ids.SELECTED_HEAD, "data"),
        State(ids.GRID_SHAPE, "data"),
        prevent_initial_call=True,
    )
    app.callback(Output(ids.HEAD_LABEL, "children"), Input(ids.SELECTED_HEAD, "data"))(head_label)
