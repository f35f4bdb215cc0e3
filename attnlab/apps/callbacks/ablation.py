"""Ablation scoring view: the selected head or the top-k of the head map's score, ablated against k random heads
over a few seeds (``attnlab.apps.ablation.run_ablation``), drawn by ``figures.ablation_bars``; only on a click.
Switching the run clears the last result and, where the run cannot be scored, says why in the status line."""

from __future__ import annotations

from dash import Input, Output, State, ctx

from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.ablation import METRICS, metrics_for, run_ablation, unavailable_reason
from attnlab.apps.state import AppState, empty_figure, failure_message

COLUMNS = ("condition", "k", "n_sets", "metric", "ci_low", "ci_high", "drop", "p_value", "heads")


def metric_options(run_name, state: AppState) -> tuple:
    """-> (metric options, value) for a run: NIAH accuracy only for NIAH runs."""
    try:
        run = state.catalog.open(run_name)
        names = metrics_for(run.info, run.inputs())
    except Exception:
        names = []
    return [{"label": METRICS[n], "value": n} for n in names], (names[-1] if names else None)


def table_component(table):
    """The causal test's rows (baseline, top-k, random) as a sortable table (AG Grid)."""
    from attnlab.apps.components import grid

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    rows = [{c: fmt(r[c]) for c in COLUMNS} for r in table.to_dict(orient="records")]
    return grid("ablation-grid", rows, list(COLUMNS), height=None)


def ablation_result(
    n_clicks, run_name, selected, result_name, source, k, metric, n_seeds, state: AppState, trigger=None
) -> tuple:
    """-> (figure, table component, status). Nothing runs before the button is pressed; a run switch
    (``trigger`` = the run selector) only clears the view and names why the new run cannot be scored, if so."""
    if not n_clicks or trigger == ids.RUN_SELECT:
        try:
            run = state.catalog.open(run_name) if run_name else None
            why = unavailable_reason(run.info, run.inputs()) if run is not None else ""
        except Exception as e:
            why = failure_message(e) if run_name else ""
        return empty_figure("pick heads and a metric, then press 'run ablation'" if not why else ""), None, why
    try:
        run = state.catalog.open(run_name)
        scores = state.catalog.result(run_name, result_name, "head_scores") if source == "top" else None
        table = run_ablation(
            state.live,
            run.info,
            source=source,
            selected=selected,
            scores=scores,
            k=k,
            metric=metric,
            n_seeds=n_seeds,
            inputs=run.inputs(),
        )
        return figures.ablation_bars(table), table_component(table), ""
    except Exception as e:
        return empty_figure(), None, failure_message(e)


def register(app, state: AppState) -> None:
    app.callback(Output(ids.ABL_METRIC, "options"), Output(ids.ABL_METRIC, "value"), Input(ids.RUN_SELECT, "value"))(
        lambda run_name: metric_options(run_name, state)
    )
    app.callback(
        Output(ids.ABL_FIGURE, "figure"),
        Output(ids.ABL_TABLE, "children"),
        Output(ids.ABL_STATUS, "children"),
        Input(ids.ABL_RUN, "n_clicks"),
        Input(ids.RUN_SELECT, "value"),
        State(ids.SELECTED_HEAD, "data"),
        State(ids.HEAD_RESULT, "value"),
        State(ids.ABL_SOURCE, "value"),
        State(ids.ABL_K, "value"),
        State(ids.ABL_METRIC, "value"),
        State(ids.ABL_SEEDS, "value"),
        running=[
            (Output(ids.ABL_BUSY, "style"), {"display": "inline", "color": "#06c"}, {"display": "none"}),
            (Output(ids.ABL_RUN, "disabled"), True, False),
        ],
    )(
        lambda n, run_name, selected, result_name, source, k, metric, seeds: ablation_result(
            n, run_name, selected, result_name, source, k, metric, seeds, state, ctx.triggered_id
        )
    )
