"""Vision view (VLM runs only; hidden for text runs): the run's image, or an uploaded one, with the selected head's
attention from the last prompt token over the patch grid overlaid (``figures.image_attention_overlay``)."""

from __future__ import annotations

from dash import Input, Output, State

from attnlab.apps import figures, ids
from attnlab.apps.run_inputs import n_prompts
from attnlab.apps.state import AppState, empty_figure, failure_message, figure_height
from attnlab.apps.vision import head_image_grid, is_vision_run

UPLOAD = "upload"
_SECTION = {"border": "1px solid #ddd", "borderRadius": "6px", "padding": "10px", "margin": "10px 0"}


def vision_visibility(run_name, state: AppState) -> tuple:
    """-> (view style, image options, image value): the view is shown for vision-language runs only."""
    try:
        run = state.catalog.open(run_name)
        info = run.info
    except Exception:
        run, info = None, {}
    if not is_vision_run(info):
        return {**_SECTION, "display": "none"}, [], None
    try:
        n = n_prompts(run)
    except Exception:
        n = 0
    from attnlab.apps.callbacks.runs import MAX_PROMPT_OPTIONS

    shown = min(n, MAX_PROMPT_OPTIONS)  # a run may claim any number of images: the dropdown lists this many at most
    options = [{"label": f"run image {i}", "value": str(i)} for i in range(shown)] + [
        {"label": "uploaded image", "value": UPLOAD}
    ]
    return {**_SECTION, "display": "block"}, options, options[0]["value"]


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
        Output(ids.VISION_VIEW, "style"),
        Output(ids.VISION_SOURCE, "options"),
        Output(ids.VISION_SOURCE, "value"),
        Input(ids.RUN_SELECT, "value"),
    )(lambda run_name: vision_visibility(run_name, state))
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
