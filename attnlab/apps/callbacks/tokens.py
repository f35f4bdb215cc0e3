"""Tokens view: a TokenScores result as a token strip with its marks (``figures.token_strip``)."""

from __future__ import annotations

from dash import Input, Output, no_update

from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.run_inputs import model_to_load, run_prompt
from attnlab.apps.state import AppState, empty_figure, failure_message

TOKEN_PAGE = 400  # tokens shown at once


def token_figure(run_name, result_name, state: AppState, start=0) -> tuple:
    """-> (figure, status message). A prompt longer than ``TOKEN_PAGE`` tokens is shown a page at a time from
    token ``start``; the title and the status line say which tokens are shown and where the rest lies."""
    if run_name is None or result_name is None:
        return empty_figure("no token scores in this run"), ""
    try:
        scores = state.catalog.result(run_name, result_name, "token_scores")
        try:
            first = max(0, int(start or 0))
        except (TypeError, ValueError):
            first = 0
        fig = figures.token_strip(scores, max_tokens=TOKEN_PAGE, start=first)
        meta = fig.layout.meta
        if (meta["start"], meta["stop"]) == (0, meta["n_tokens"]):
            return fig, ""
        rest = []
        if meta["start"] > 0:
            rest.append(f"tokens 0–{meta['start'] - 1} before")
        if meta["stop"] < meta["n_tokens"]:
            rest.append(f"tokens {meta['stop']}–{meta['n_tokens'] - 1} after")
        marks = f", {meta['marks_outside']} marked tokens among them" if meta["marks_outside"] else ""
        line = (
            f"showing tokens {meta['start']}–{meta['stop'] - 1} of {meta['n_tokens']} ({' and '.join(rest)}{marks}); "
            "set 'from token' to page through the prompt"
        )
        return fig, line
    except Exception as e:
        return empty_figure(), failure_message(e)


def head_row_figure(run_name, result_name, selected, state: AppState) -> tuple:
    """-> (figure, status): the selected head's attention from the last token of the token score's prompt (the
    tokens view follows the selected head). Anything that cannot be drawn is the figure's one-line message."""
    if not selected:
        return empty_figure("select a head to see its attention from the prompt's last token"), ""
    if run_name is None or result_name is None:
        return empty_figure(""), ""
    try:
        scores = state.catalog.result(run_name, result_name, "token_scores")
        index = getattr(scores, "prompt_index", None)
        if index is None or int(index) < 0:
            return empty_figure("this token score belongs to no single prompt of the run"), ""
        run = state.catalog.open(run_name)
        layer, head = int(selected["layer"]), int(selected["head"])
        data = state.live.pattern(model_to_load(run.info), run_prompt(state.live, run, int(index)), layer, head)
        if len(data.tokens) != len(scores.tokens):
            return empty_figure(f"the token score's {len(scores.tokens)} tokens are not run prompt {index}"), ""
        fig = figures.query_row_strip(
            data.weights, data.tokens, query=-1, layer=layer, head=head, model=data.model, max_tokens=TOKEN_PAGE
        )
        return fig, ""
    except Exception as e:
        return empty_figure(failure_message(e)), failure_message(e)


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.TOKENS_HEAD, "figure"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.TOKEN_RESULT, "value"),
        Input(ids.SELECTED_HEAD, "data"),
        Input(ids.TABS, "value"),
    )(
        lambda run_name, result_name, selected, tab: (
            head_row_figure(run_name, result_name, selected, state)[0] if tab == "tokens" else no_update
        )
    )
    app.callback(
        Output(ids.TOKEN_STRIP, "figure"),
        Output(ids.TOKEN_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.TOKEN_RESULT, "value"),
        Input(ids.TOKEN_START, "value"),
    )(lambda run_name, result_name, start: token_figure(run_name, result_name, state, start))
