"""Tokens view: a TokenScores result as a token strip with its marks (``figures.token_strip``)."""

from __future__ import annotations

from dash import Input, Output

from attnlab.apps import figures, ids
from attnlab.apps.state import AppState, empty_figure, failure_message


def token_figure(run_name, result_name, state: AppState) -> tuple:
    """-> (figure, status message)."""
    if run_name is None or result_name is None:
        return empty_figure("no token scores in this run"), ""
    try:
        return figures.token_strip(state.catalog.result(run_name, result_name, "token_scores")), ""
    except Exception as e:
        return empty_figure(), failure_message(e)


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.TOKEN_STRIP, "figure"),
        Output(ids.TOKEN_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.TOKEN_RESULT, "value"),
    )(lambda run_name, result_name: token_figure(run_name, result_name, state))
