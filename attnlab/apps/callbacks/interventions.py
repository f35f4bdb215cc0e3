"""Interventions view: a typed prompt on the selected run's model without and with a registry intervention
(``attnlab.apps.interventions.run_comparison``): both greedy outputs, the answer probability and its change in a
table, and the selected head's attention difference (``ComparisonResult.plot()`` = ``figures.attention_difference``).
Nothing runs before the button; methods that cannot run without fit data say why in the page. Fitted interventions
of the runs directory (``attnlab intervene --out NAME``) are dropdown entries ``"fitted:NAME"``: picking one clears the
parameters box (it runs as fitted) and says what it was fitted on, or why it cannot run on this run's model."""

from __future__ import annotations

from dash import Input, Output, State, html

from attnlab.apps import ids
from attnlab.apps.interventions import (
    DEFAULT_PARAMS,
    availability,
    fitted_name,
    fitted_summary,
    load_fitted,
    method_summary,
    run_comparison,
)
from attnlab.apps.run_inputs import model_to_load
from attnlab.apps.state import AppState, empty_figure, failure_message, figure_height

COLUMNS = ("run", "output", "top_token", "answer_token", "p_answer", "delta_p")
IV_TABLE = "iv-table"


def method_info(method, run_name, state: AppState) -> tuple:
    """-> (parameters text, info line) when a method or run is picked: the method's description and whether it
    runs on the run's model with its default parameters (else the one-line reason)."""
    params = DEFAULT_PARAMS.get(method, "")
    if not method:
        return params, ""
    name = fitted_name(method)
    if name is not None:
        return "", fitted_info(name, run_name, state)
    try:
        line = method_summary(method)
    except Exception as e:
        return params, failure_message(e)
    try:
        model_name = model_to_load(state.catalog.open(run_name).info)
        status = availability(state.live, model_name, method, params)
    except Exception as e:
        status = failure_message(e)
    return params, f"{line} — {status}"


def fitted_info(name, run_name, state: AppState) -> str:
    """The info line of a fitted run's intervention: what it was fitted on, and whether it fits this run's model."""
    try:
        line = fitted_summary(load_fitted(state.catalog, name), name)
    except Exception as e:
        return failure_message(e)
    try:
        model_name = model_to_load(state.catalog.open(run_name).info)
        status = availability(state.live, model_name, f"fitted:{name}", "", catalog=state.catalog)
    except Exception as e:
        status = failure_message(e)
    return f"{line} — {status}"


def table_component(result):
    """Both runs' outputs and answer probabilities as a sortable table (AG Grid)."""
    from attnlab.apps.components import grid

    def fmt(c, v):
        if isinstance(v, float):
            return f"{v:+.4f}" if c == "delta_p" else f"{v:.4f}"
        return repr(v) if c in ("output", "top_token", "answer_token") else str(v)

    rows = [{c: fmt(c, r[c]) for c in COLUMNS} for r in result.to_frame().to_dict(orient="records")]
    return grid(IV_TABLE, rows, list(COLUMNS), height=None)


def summary_line(result) -> str:
    """One line under the table: the answer, its probability change, and which head is drawn."""
    which = "expected answer" if result.answer_given else "baseline's top token"
    touched = {True: "a head the intervention edits", False: "not a head the intervention edits directly", None: ""}[
        result.head_touched
    ]
    line = (
        f"{which} {result.answer_token!r}: p {result.p_baseline:.4f} → {result.p_intervened:.4f} "
        f"(Δ {result.delta_p:+.4f}); pattern of L{result.layer}H{result.head}{', ' + touched if touched else ''}"
    )
    return f"{line}. Note: {result.note}" if result.note else line


@figure_height(ids.IV_FIGURE)
def comparison(n_clicks, run_name, selected, method, params, prompt, answer, state: AppState) -> tuple:
    """-> (figure, outputs component, status)."""
    if not n_clicks:
        return empty_figure("pick a method, type a prompt, then press 'run intervention'"), None, ""
    try:
        info = state.catalog.open(run_name).info
        head = (int(selected["layer"]), int(selected["head"])) if selected else None
        result = run_comparison(
            state.live, model_to_load(info), method, params, prompt, answer, head, catalog=state.catalog
        )
        return (
            result.plot(max_size=state.max_pattern_size),
            html.Div([table_component(result), html.Div(summary_line(result), style={"marginTop": "4px"})]),
            "",
        )
    except Exception as e:
        return empty_figure(), None, failure_message(e)


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.IV_PARAMS, "value"),
        Output(ids.IV_INFO, "children"),
        Input(ids.IV_METHOD, "value"),
        Input(ids.RUN_SELECT, "value"),
    )(lambda method, run_name: method_info(method, run_name, state))
    app.callback(
        Output(ids.IV_FIGURE, "figure"),
        Output(ids.IV_OUTPUTS, "children"),
        Output(ids.IV_STATUS, "children"),
        Input(ids.IV_RUN, "n_clicks"),
        State(ids.RUN_SELECT, "value"),
        State(ids.SELECTED_HEAD, "data"),
        State(ids.IV_METHOD, "value"),
        State(ids.IV_PARAMS, "value"),
        State(ids.IV_PROMPT, "value"),
        State(ids.IV_ANSWER, "value"),
        running=[
            (Output(ids.IV_BUSY, "style"), {"display": "inline", "color": "#06c"}, {"display": "none"}),
            (Output(ids.IV_RUN, "disabled"), True, False),
        ],
    )(
        lambda n, run_name, selected, method, params, prompt, answer: comparison(
            n, run_name, selected, method, params, prompt, answer, state
        )
    )
