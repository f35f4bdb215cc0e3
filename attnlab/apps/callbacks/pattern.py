"""Attention pattern view: the selected head's token x token pattern on a prompt, computed live.

The run's model is loaded by the name the run recorded (``attnlab.load``), never by anything the browser sends.
"""
from __future__ import annotations

from dash import Input, Output, State

from attnlab.apps import figures, ids
from attnlab.apps.callbacks.runs import TYPED
from attnlab.apps.state import AppState, empty_figure, failure_message
from attnlab.errors import AttnlabError


def _prompt(run, choice, typed, state: AppState) -> str | list[int]:
    """The typed text, or the token ids of one of the run's own prompts."""
    if choice == TYPED or choice is None:
        if not typed or not str(typed).strip():
            raise AttnlabError("type a prompt in the box above, or pick one of the run's prompts")
        return str(typed)
    try:
        index = int(choice)
    except (TypeError, ValueError):
        raise AttnlabError(f"unknown prompt choice {str(choice)[:40]!r}") from None
    return state.live.run_prompt_ids(run.info, index)


def _window(start, size, n: int) -> tuple[int, int] | None:
    if not start and not size:
        return None
    s = max(0, int(start or 0))
    if s >= n:
        raise AttnlabError(f"the window starts at query {s} but the prompt has {n} tokens")
    return s, n if not size else min(n, s + max(1, int(size)))


def pattern_figure(run_name, selected, choice, typed, start, size, state: AppState) -> tuple:
    """-> (figure, status message). Failures give an empty figure and a one-line message."""
    if not selected:
        return empty_figure("select a head on the head map"), ""
    try:
        run = state.catalog.open(run_name)
        layer, head = int(selected["layer"]), int(selected["head"])
        prompt = _prompt(run, choice, typed, state)
        data = state.live.pattern(run.info["model"]["name"], prompt, layer, head)
        window = _window(start, size, len(data.tokens))
        fig = figures.attention_pattern(data.weights, data.tokens, layer=layer, head=head, model=data.model, window=window, max_size=state.max_pattern_size)
        return fig, ""
    except Exception as e:
        return empty_figure(), failure_message(e)


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.PATTERN, "figure"),
        Output(ids.PATTERN_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.SELECTED_HEAD, "data"),
        Input(ids.PROMPT_SELECT, "value"),
        Input(ids.RUN_PROMPT, "n_clicks"),
        Input(ids.WINDOW_START, "value"),
        Input(ids.WINDOW_SIZE, "value"),
        State(ids.CUSTOM_PROMPT, "value"),  # read when something else fires: keystrokes never start a live run
        running=[(Output(ids.PATTERN_BUSY, "style"), {"display": "inline", "color": "#06c"}, {"display": "none"})],
    )(lambda run_name, selected, choice, _clicks, start, size, typed: pattern_figure(run_name, selected, choice, typed, start, size, state))
