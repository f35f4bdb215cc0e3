"""Attention pattern view: the selected head's token x token pattern on a prompt, computed live, or one query row of
it as a token strip (a click on a pattern row picks that row).

The run's model is loaded by the name the run recorded (``attnlab.load``), never by anything the browser sends.
"""

from __future__ import annotations

import re

from dash import Input, Output, State

from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.live import RunPrompt
from attnlab.apps.run_inputs import TYPED, model_to_load, run_prompt
from attnlab.apps.state import AppState, empty_figure, failure_message, figure_height
from attnlab.errors import AttnlabError

_ROW_LABEL = re.compile(r"^(\d{1,7})[:-]")


def chosen_prompt(run, choice, typed, state: AppState) -> str | RunPrompt:
    """The typed text, or one of the run's own prompts as the scan saw it (read from the run, never regenerated
    where the run kept its inputs)."""
    if choice == TYPED or choice is None:
        if not typed or not str(typed).strip():
            raise AttnlabError("type a prompt in the box above, or pick one of the run's prompts")
        return str(typed)
    try:
        index = int(choice)
    except (TypeError, ValueError):
        raise AttnlabError(f"unknown prompt choice {str(choice)[:40]!r}") from None
    return run_prompt(state.live, run, index)


def _window(start, size, n: int) -> tuple[int, int] | None:
    if not start and not size:
        return None
    s = max(0, int(start or 0))
    if s >= n:
        raise AttnlabError(f"the window starts at query {s} but the prompt has {n} tokens")
    return s, n if not size else min(n, s + max(1, int(size)))


@figure_height(ids.PATTERN)
def pattern_figure(
    run_name, selected, choice, typed, start, size, state: AppState, mode: str = "pattern", query=None, log=False
) -> tuple:
    """-> (figure, status message). ``mode="row"`` shows query row ``query`` (None = the last token) as a token
    strip (``figures.query_row_strip``) instead of the windowed pattern; ``log`` colours the pattern on a log
    scale. Failures give an empty figure and a one-line message."""
    if not selected:
        return empty_figure("select a head on the head map"), ""
    try:
        run = state.catalog.open(run_name)
        layer, head = int(selected["layer"]), int(selected["head"])
        prompt = chosen_prompt(run, choice, typed, state)
        data = state.live.pattern(model_to_load(run.info), prompt, layer, head)
        n = len(data.tokens)
        if mode == "row":
            q = n - 1 if query is None else int(query)
            if not 0 <= q < n:
                raise AttnlabError(f"query row {q} is outside the prompt's {n} tokens (0-{n - 1})")
            fig = figures.query_row_strip(
                data.weights,
                data.tokens,
                query=q,
                layer=layer,
                head=head,
                model=data.model,
                max_tokens=4 * state.max_pattern_size,
            )  # one row is cheap: more keys than a pattern's side
            return fig, ""
        window = _window(start, size, n)
        fig = figures.attention_pattern(
            data.weights,
            data.tokens,
            layer=layer,
            head=head,
            model=data.model,
            window=window,
            max_size=state.max_pattern_size,
            log=bool(log),
        )
        return fig, ""
    except Exception as e:
        return empty_figure(), failure_message(e)


def row_from_click(click_data, mode, current):
    """The query row after a click on the full pattern: the first position of the clicked row's label (``"12:tok"``
    or ``"12-19:tok…"``). Clicks on the row strip, or anything unreadable, keep ``current``."""
    if mode != "pattern":
        return current
    try:
        label = str(click_data["points"][0]["y"])
        return int(_ROW_LABEL.match(label).group(1))
    except (TypeError, KeyError, IndexError, AttributeError):
        return current


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
        Input(ids.PATTERN_MODE, "value"),
        Input(ids.QUERY_ROW, "value"),
        Input(ids.PATTERN_LOG, "value"),
        State(ids.CUSTOM_PROMPT, "value"),  # read when something else fires: keystrokes never start a live run
        running=[(Output(ids.PATTERN_BUSY, "style"), {"display": "inline", "color": "#06c"}, {"display": "none"})],
    )(
        lambda run_name, selected, choice, _clicks, start, size, mode, query, log, typed: pattern_figure(
            run_name, selected, choice, typed, start, size, state, mode, query, "log" in (log or [])
        )
    )
    app.callback(
        Output(ids.QUERY_ROW, "value"),
        Input(ids.PATTERN, "clickData"),
        State(ids.PATTERN_MODE, "value"),
        State(ids.QUERY_ROW, "value"),
        prevent_initial_call=True,
    )(row_from_click)
