"""The app's explore views, as a layout function a page can host: a grid of all heads of a layer
(``attnlab.patterns``), the selected head (or its layer) on two prompts with their difference
(``attnlab.compare_patterns``), and head direct logit attribution to an answer (``attnlab.head_dla``).

They read the attention pattern view's prompt (a run prompt or the typed one) and the selected head; the callbacks
(``attnlab.apps.callbacks.explore``) compute through ``LiveModels`` (cached queries and keys for the grid and the
comparison, one locked forward pass for DLA) and draw the notebook's figures (``attnlab.pattern_figures``).
"""

from __future__ import annotations

import dash_mantine_components as dmc
from dash import dcc, html

from attnlab.apps import ids
from attnlab.apps.components import NOTE as _NOTE
from attnlab.apps.components import ROW, card, graph
from attnlab.apps.components import STATUS as _STATUS
from attnlab.apps.state import AppState


def _section(title: str, view_id: str, children: list):
    return card(title, view_id, children)


def explore_views(state: AppState) -> list[html.Div]:
    """The three sections, in page order."""
    return [
        _section(
            "All heads of a layer",
            ids.GRID_VIEW,
            [
                html.Div("the attention pattern view's prompt, every head of one layer", style=_NOTE),
                html.Div(
                    [
                        "layer: ",
                        dcc.Dropdown(
                            id=ids.GRID_LAYER,
                            options=[{"label": "the selected head's layer", "value": "selected"}],
                            value="selected",
                            clearable=False,
                            style={"width": "260px", "display": "inline-block", "verticalAlign": "middle"},
                        ),
                    ]
                ),
                *graph(ids.GRID_FIGURE),
                html.Div(id=ids.GRID_STATUS, style=_STATUS),
            ],
        ),
        _section(
            "Two prompts compared",
            ids.CMP_VIEW,
            [
                html.Div(
                    "A: the attention pattern view's prompt; B: the prompt below (same heads, and B − A)", style=_NOTE
                ),
                dcc.Textarea(
                    id=ids.CMP_PROMPT,
                    placeholder=f"prompt B, e.g. A with one word changed (at most {state.live.max_chars} characters)",
                    maxLength=state.live.max_chars,
                    style={"width": "100%", "height": "50px"},
                ),
                dcc.RadioItems(
                    id=ids.CMP_SCOPE,
                    options=[
                        {"label": " the selected head", "value": "head"},
                        {"label": " every head of its layer", "value": "layer"},
                    ],
                    value="head",
                    inline=True,
                    inputStyle={"marginLeft": "8px"},
                    style={"display": "inline-block"},
                ),
                dmc.Button("compare", id=ids.CMP_RUN, n_clicks=0, size="compact-sm", ml="md"),
                *graph(ids.CMP_FIGURE),
                html.Div(id=ids.CMP_STATUS, style=_STATUS),
            ],
        ),
        _section(
            "Head direct logit attribution",
            ids.DLA_VIEW,
            [
                html.Div(
                    "each head's direct effect on the answer's logit at the prompt's last token, by source position "
                    "(the attention pattern view's prompt)",
                    style=_NOTE,
                ),
                html.Div(
                    [
                        "answer: ",
                        dcc.Input(id=ids.DLA_ANSWER, type="text", value="", maxLength=200, style={"width": "200px"}),
                        " minus (optional): ",
                        dcc.Input(
                            id=ids.DLA_CONTRAST,
                            type="text",
                            value="",
                            maxLength=200,
                            placeholder="a contrast answer",
                            style={"width": "200px"},
                        ),
                        dmc.Button("attribute", id=ids.DLA_RUN, n_clicks=0, size="compact-sm"),
                    ],
                    style=ROW,
                ),
                *graph(ids.DLA_FIGURE),
                html.Div(id=ids.DLA_STATUS, style=_STATUS),
            ],
        ),
    ]
