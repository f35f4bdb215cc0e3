"""Census view (Heads tab, runs written by ``attnlab census``): every head on two statistics
(``figures.census_scatter``), the compared run's census beside it on the same statistics, and a clicked head's
pattern on its top examples.

Top examples: the census run's own prompts (its kept inputs, at most ``EXAMPLE_PROMPTS``), ranked by the head's
activation on each as HeadVis defines it for its example sequences (``attnlab.probes.headvis_examples``): the
largest attention weight with the first position left out as query and as key (the usual sink), highest first --
the sequences HeadVis's top interval keeps. The ``N_EXAMPLES`` highest are drawn. Patterns come from the live
cache of queries and keys, one forward pass per new prompt.
"""

from __future__ import annotations

import numpy as np
from dash import Input, Output, State

from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.run_inputs import model_to_load, n_prompts, run_prompt
from attnlab.apps.state import AppState, empty_figure, failure_message
from attnlab.errors import AttnlabError

EXAMPLE_PROMPTS = 6  # prompts of the census searched for a head's top examples
N_EXAMPLES = 3  # drawn side by side
DEFAULT_X = ("first_token_sink", "act_first_score")  # sinks on x ...
DEFAULT_Y = ("prev_token_score", "induction_score", "pattern_entropy")  # ... against a pattern statistic on y
_SHOWN = {"display": "block"}
_HIDDEN = {"display": "none"}


def load_census(run_name, state: AppState):
    """The ``Census`` of a run of the catalog, or None when the run is no census (or is not a run)."""
    from attnlab.census import Census, census_json

    try:
        run = state.catalog.open(run_name)
    except Exception:
        return None
    if census_json(run.directory) is None:
        return None
    return Census.load(run.directory)


def census_options(run_name, x, y, state: AppState) -> tuple:
    """-> (view style, statistic options, x, y): the view shows for census runs; ``x`` / ``y`` are kept where the
    census has them (a bookmarked URL's axes), else its first two statistics."""
    try:
        census = load_census(run_name, state)
    except Exception:
        census = None
    if census is None or not census.statistics:
        return _HIDDEN, [], None, None
    names = census.statistics
    options = [{"label": n, "value": n} for n in names]
    x = x if x in names else next((n for n in DEFAULT_X if n in names), names[0])
    y = y if y in names else next((n for n in DEFAULT_Y if n in names and n != x), names[-1])
    return _SHOWN, options, x, y


def census_figures(run_name, compare, x, y, selected, state: AppState) -> tuple:
    """-> (scatter of this run, scatter of the compared run, status). The selected head is ringed on both."""
    try:
        census = load_census(run_name, state)
        if census is None:
            return empty_figure(), empty_figure(), ""
        fig = _scatter(census, run_name, x, y, selected)
    except Exception as e:
        return empty_figure(), empty_figure(), failure_message(e)
    if not compare or compare == run_name:
        return fig, None, ""
    try:
        other = load_census(compare, state)
        if other is None:
            return fig, empty_figure(f"{compare} is no census run: compare with a run written by `attnlab census`"), ""
        return fig, _scatter(other, compare, x, y, selected), ""
    except Exception as e:
        return fig, empty_figure(failure_message(e)), ""


def _scatter(census, name: str, x, y, selected):
    for s in (x, y):
        if s not in census.scores:
            why = census.not_scored.get(s, "not in this census")
            raise AttnlabError(f"{name}: statistic {s!r} is not scored ({why})")
    fig = census.plot(x, y, title=f"{name}: {census.info.get('model', {}).get('name', '?')}")
    if selected and "layer" in selected:
        frame = census.to_frame()
        row = frame[(frame["layer"] == int(selected["layer"])) & (frame["head"] == int(selected["head"]))]
        if len(row):
            fig.add_scatter(
                x=row[x],
                y=row[y],
                mode="markers",
                marker={"size": 18, "color": "rgba(0,0,0,0)", "line": {"width": 3, "color": "#e8590c"}},
                hoverinfo="skip",
                showlegend=False,
            )
    fig.update_layout(height=480, showlegend=False)
    return fig


def max_activation(weights: np.ndarray) -> float:
    """HeadVis's activation of a head on one sequence: ``max_{q >= 1, k >= 1} A[q, k]`` (positions from the
    sequence's first token; NaN for a sequence of one token)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w[1:, 1:].max()) if min(w.shape) > 1 else float("nan")


def examples_figure(run_name, selected, state: AppState):
    """The selected head's pattern on its top examples among the census run's prompts (highest activation first)."""
    if not selected or "layer" not in selected:
        return empty_figure("click a head in the scatter to see its pattern on its top examples")
    try:
        if load_census(run_name, state) is None:
            return empty_figure("")
        run = state.catalog.open(run_name)
        layer, head = int(selected["layer"]), int(selected["head"])
        model_name = model_to_load(run.info)
        found = []
        for i in range(min(EXAMPLE_PROMPTS, n_prompts(run))):
            data = state.live.pattern(model_name, run_prompt(state.live, run, i), layer, head)
            found.append((max_activation(data.weights), i, data))
        if not found:
            return empty_figure("the census kept no prompts to draw the head on")
        found.sort(key=lambda t: (np.isnan(t[0]), -np.nan_to_num(t[0]), t[1]))  # highest first, one-token last
        examples = [(d.weights, d.tokens, f"prompt {i} (max {a:.3f})") for a, i, d in found[:N_EXAMPLES]]
        return figures.head_examples(examples, layer=layer, head=head, model=found[0][2].model)
    except Exception as e:
        return empty_figure(failure_message(e))


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.CENSUS_VIEW, "style"),
        Output(ids.CENSUS_X, "options"),
        Output(ids.CENSUS_X, "value"),
        Output(ids.CENSUS_Y, "options"),
        Output(ids.CENSUS_Y, "value"),
        Input(ids.RUN_SELECT, "value"),
        State(ids.CENSUS_X, "value"),
        State(ids.CENSUS_Y, "value"),
    )(lambda run_name, x, y: _options_out(census_options(run_name, x, y, state)))
    app.callback(
        Output(ids.CENSUS_FIGURE, "figure"),
        Output(ids.CENSUS_OTHER, "figure"),
        Output(ids.CENSUS_STATUS, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.COMPARE_SELECT, "value"),
        Input(ids.CENSUS_X, "value"),
        Input(ids.CENSUS_Y, "value"),
        Input(ids.SELECTED_HEAD, "data"),
    )(lambda run_name, compare, x, y, selected: census_figures(run_name, compare, x, y, selected, state))
    app.callback(
        Output(ids.CENSUS_EXAMPLES, "figure"),
        Input(ids.CENSUS_FIGURE, "clickData"),
        State(ids.SELECTED_HEAD, "data"),
        State(ids.RUN_SELECT, "value"),
        prevent_initial_call=True,
    )(lambda click, selected, run_name: examples_figure(run_name, _clicked(click) or selected, state))


def _options_out(t: tuple) -> tuple:
    style, options, x, y = t
    return style, options, x, options, y


def _clicked(click) -> dict | None:
    try:
        layer, head = click["points"][0]["customdata"][:2]
        return {"layer": int(layer), "head": int(head)}
    except (TypeError, KeyError, IndexError, ValueError):
        return None
