"""Vision view (VLM runs only; hidden for text runs): the run's image, or an uploaded one, with the selected head's
attention from the last prompt token over the patch grid overlaid (``figures.image_attention_overlay``)."""

from __future__ import annotations

from dash import Input, Output, State, no_update

from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.run_inputs import n_prompts
from attnlab.apps.state import AppState, empty_figure, failure_message, figure_height
from attnlab.apps.vision import head_image_grid, is_vision_run

UPLOAD = "upload"


def vision_visibility(run_name, state: AppState) -> tuple:
    """-> (Vision tab style, image options, image value): the tab is shown for vision-language runs only."""
    try:
        run = state.catalog.open(run_name)
        info = run.info
    except Exception:
        run, info = None, {}
    if not is_vision_run(info):
        return {"display": "none"}, [], None
    try:
        n = n_prompts(run)
    except Exception:
        n = 0
    from attnlab.apps.callbacks.runs import MAX_PROMPT_OPTIONS

    shown = min(n, MAX_PROMPT_OPTIONS)  # a run may claim any number of images: the dropdown lists this many at most
    options = [{"label": f"run image {i}", "value": str(i)} for i in range(shown)] + [
        {"label": "uploaded image", "value": UPLOAD}
    ]
    return {"display": "block"}, options, options[0]["value"]


def vision_tab(run_name, tab, state: AppState) -> tuple:
    """``vision_visibility`` plus the active tab: leaving a vision run while its Vision tab is open goes to Heads."""
    style, options, value = vision_visibility(run_name, state)
    hidden = style.get("display") == "none"
    return style, options, value, ("heads" if hidden and tab == "vision" else no_update)


@figure_height(ids.VISION_FIGURE)
def vision_figure(run_name, selected, choice, upload, question, state: AppState) -> tuple:
    """-> (figure, status). Text runs get an empty figure and no message (the view is hidden)."""
    try:
        run = state.catalog.open(run_name)
        info = run.info
        if not is_vision_run(info):
            return empty_figure(), ""
        if choice == UPLOAD and not upload:
            return empty_figure("upload an image"), ""
        image, grid, layer, head = head_image_grid(
            state.live, info, selected, choice, upload, question if choice == UPLOAD else None, inputs=run.inputs()
        )
        return figures.image_attention_overlay(image, grid, layer=layer, head=head), ""
    except Exception as e:
        return empty_figure(), failure_message(e)


def uploaded(contents, current):
    """A new upload switches the image choice to it."""
    return UPLOAD if contents else current


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.TAB_VISION, "style"),
        Output(ids.VISION_SOURCE, "options"),
        Output(ids.VISION_SOURCE, "value"),
        Output(ids.TABS, "value"),
        Input(ids.RUN_SELECT, "value"),
        State(ids.TABS, "value"),
    )(lambda run_name, tab: vision_tab(run_name, tab, state))
    app.callback(
        Output(ids.VISION_SOURCE, "value", allow_duplicate=True),
        Input(ids.VISION_UPLOAD, "contents"),
        State(ids.VISION_SOURCE, "value"),
        prevent_initial_call=True,
    )(uploaded)
    app.callback(
        Output(ids.VISION_FIGURE, "figure"),
        Output(ids.VISION_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.SELECTED_HEAD, "data"),
        Input(ids.VISION_SOURCE, "value"),
        Input(ids.VISION_UPLOAD, "contents"),
        Input(ids.VISION_QUESTION, "value"),
        running=[(Output(ids.VISION_BUSY, "style"), {"display": "inline", "color": "#06c"}, {"display": "none"})],
    )(
        lambda run_name, selected, choice, upload, question: vision_figure(
            run_name, selected, choice, upload, question, state
        )
    )
