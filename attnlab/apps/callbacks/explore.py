"""Explore views (``attnlab.apps.explore``): a grid of a layer's heads, two prompts compared, head DLA.

Plain functions (unit-testable without a browser) plus ``register(app, state)``. The grid and the comparison
reuse the live cache of queries and keys (one forward pass per prompt, then one product per head); DLA runs one
forward pass under the live-model lock, only on a click. Failures give an empty figure and a one-line message.
"""

from __future__ import annotations

import numpy as np
from dash import Input, Output, State, no_update

from attnlab.apps import ids
from attnlab.apps.callbacks.pattern import chosen_prompt
from attnlab.apps.live import RunPrompt
from attnlab.apps.run_inputs import model_to_load
from attnlab.apps.state import AppState, empty_figure, failure_message
from attnlab.attention import AttentionPatterns, PatternComparison
from attnlab.errors import AttnlabError

MAX_GRID_HEADS = 64  # heads drawn at once in the grid (a wider layer shows its first 64, and says so)


def layer_options(run_name, state: AppState) -> list[dict]:
    """The selected head's layer, then every layer of the run's model."""
    try:
        n = int(state.catalog.open(run_name).info.get("model", {}).get("n_layers", 0) or 0)
    except Exception:
        n = 0
    return [{"label": "the selected head's layer", "value": "selected"}] + [
        {"label": f"layer {l}", "value": str(l)} for l in range(n)
    ]


def _patterns(state: AppState, run, prompt, heads: list[tuple[int, int]]) -> AttentionPatterns:
    model_name = model_to_load(run.info)
    data = [state.live.pattern(model_name, prompt, l, h) for l, h in heads]
    return AttentionPatterns(
        weights=np.stack([d.weights for d in data]), tokens=data[0].tokens, heads=heads, model=data[0].model
    )


def grid_figure(run_name, selected, choice, typed, layer_value, state: AppState) -> tuple:
    """-> (figure, status): every head of the chosen layer (default: the selected head's layer) on the pattern
    view's prompt, as a grid (``pattern_figures.pattern_grid``)."""
    if not selected and (layer_value in (None, "selected")):
        return empty_figure("select a head on the head map"), ""
    try:
        run = state.catalog.open(run_name)
        n_heads = int(run.info["model"]["n_heads"])
        layer = int(selected["layer"]) if layer_value in (None, "selected") else int(layer_value)
        heads = [(layer, h) for h in range(min(n_heads, MAX_GRID_HEADS))]
        patterns = _patterns(state, run, chosen_prompt(run, choice, typed, state), heads)
        fig = patterns.plot(max_size=64)
        more = f"showing the first {MAX_GRID_HEADS} of {n_heads} heads" if n_heads > MAX_GRID_HEADS else ""
        return fig, more
    except Exception as e:
        return empty_figure(), failure_message(e)


def comparison_figure(n_clicks, run_name, selected, choice, typed, prompt_b, scope, state: AppState) -> tuple:
    """-> (figure, status): the selected head (or its layer) on the pattern view's prompt (A) and ``prompt_b``."""
    if not n_clicks:
        return empty_figure("type prompt B, then press 'compare'"), ""
    try:
        if not selected:
            raise AttnlabError("select a head on the head map")
        if not prompt_b or not str(prompt_b).strip():
            raise AttnlabError("type prompt B first")
        run = state.catalog.open(run_name)
        layer, head = int(selected["layer"]), int(selected["head"])
        heads = [(layer, h) for h in range(int(run.info["model"]["n_heads"]))] if scope == "layer" else [(layer, head)]
        a = _patterns(state, run, chosen_prompt(run, choice, typed, state), heads)
        b = _patterns(state, run, str(prompt_b), heads)
        comparison = PatternComparison(a, b, labels=("A", "B"))
        note = "" if len(heads) <= 6 else f"the first 6 of {len(heads)} heads are drawn"
        return comparison.plot(max_size=64), note
    except Exception as e:
        return empty_figure(), failure_message(e)


def dla_result(n_clicks, run_name, choice, typed, answer, contrast, state: AppState) -> tuple:
    """-> (figure, status): head DLA of ``answer`` (minus ``contrast``) at the last token of the pattern view's
    prompt (``attnlab.head_dla``), under the live-model lock."""
    if not n_clicks:
        return empty_figure("type an answer, then press 'attribute'"), ""
    try:
        from attnlab.dla import head_dla

        if not answer or not str(answer).strip():
            raise AttnlabError("type the answer whose logit is attributed")
        run = state.catalog.open(run_name)
        prompt = chosen_prompt(run, choice, typed, state)
        if isinstance(prompt, RunPrompt):
            if prompt.image is not None:
                raise AttnlabError("head DLA runs on text prompts; this run prompt has an image")
            prompt = list(prompt.ids)
        with state.live.exclusive(model_to_load(run.info)) as model:
            result = head_dla(
                model, prompt, str(answer), contrast=str(contrast) if contrast and contrast.strip() else None
            )
        return result.plot(), ""
    except Exception as e:
        return empty_figure(), failure_message(e)


def register(app, state: AppState) -> None:
    app.callback(Output(ids.GRID_LAYER, "options"), Input(ids.RUN_SELECT, "value"))(
        lambda run_name: layer_options(run_name, state)
    )
    app.callback(
        Output(ids.GRID_FIGURE, "figure"),
        Output(ids.GRID_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.SELECTED_HEAD, "data"),
        Input(ids.PROMPT_SELECT, "value"),
        Input(ids.RUN_PROMPT, "n_clicks"),
        Input(ids.GRID_LAYER, "value"),
        Input(ids.TABS, "value"),
        State(ids.CUSTOM_PROMPT, "value"),
    )(
        # a layer's heads cost one product each: drawn while the Explore tab is open, not on every head change
        lambda run_name, selected, choice, _clicks, layer, tab, typed: (
            grid_figure(run_name, selected, choice, typed, layer, state) if tab == "explore" else (no_update, no_update)
        )
    )
    app.callback(
        Output(ids.CMP_FIGURE, "figure"),
        Output(ids.CMP_STATUS, "children"),
        Input(ids.CMP_RUN, "n_clicks"),
        State(ids.RUN_SELECT, "value"),
        State(ids.SELECTED_HEAD, "data"),
        State(ids.PROMPT_SELECT, "value"),
        State(ids.CUSTOM_PROMPT, "value"),
        State(ids.CMP_PROMPT, "value"),
        State(ids.CMP_SCOPE, "value"),
    )(
        lambda n, run_name, selected, choice, typed, prompt_b, scope: comparison_figure(
            n, run_name, selected, choice, typed, prompt_b, scope, state
        )
    )
    app.callback(
        Output(ids.DLA_FIGURE, "figure"),
        Output(ids.DLA_STATUS, "children"),
        Input(ids.DLA_RUN, "n_clicks"),
        State(ids.RUN_SELECT, "value"),
        State(ids.PROMPT_SELECT, "value"),
        State(ids.CUSTOM_PROMPT, "value"),
        State(ids.DLA_ANSWER, "value"),
        State(ids.DLA_CONTRAST, "value"),
    )(
        lambda n, run_name, choice, typed, answer, contrast: dla_result(
            n, run_name, choice, typed, answer, contrast, state
        )
    )
