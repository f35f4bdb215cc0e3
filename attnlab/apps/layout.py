"""The page: ten views (runs, head map, attention pattern, tokens, vision for VLM runs, a layer's heads as a grid,
two prompts compared, head DLA, interventions, ablation scoring) in one column. Ids come from ``ids.py``.

``build_layout`` is called on every page load (``app.layout`` is a function), so new runs appear on refresh.
"""

from __future__ import annotations

from dash import dcc, html

from attnlab.apps import ids
from attnlab.apps.ablation import MAX_K, MAX_SEEDS
from attnlab.apps.callbacks.tokens import TOKEN_PAGE
from attnlab.apps.explore import explore_views
from attnlab.apps.interventions import DEFAULT_PARAMS, MAX_PARAMS_CHARS, method_options
from attnlab.apps.state import GRAPH_HEIGHTS, AppState, failure_message
from attnlab.apps.vision import MAX_UPLOAD_BYTES, UPLOAD_QUESTION

_SECTION = {"border": "1px solid #ddd", "borderRadius": "6px", "padding": "10px", "margin": "10px 0"}
_STATUS = {"color": "#a33", "minHeight": "1.2em", "fontSize": "90%"}
_CELL = {"padding": "2px 10px", "borderBottom": "1px solid #eee", "textAlign": "left"}


def _inline(width: str) -> dict:
    """Style of a control that sits inline in a row of labelled controls."""
    return {"width": width, "display": "inline-block", "verticalAlign": "middle"}


def _section(title: str, view_id: str, children: list, *, hidden: bool = False) -> html.Div:
    """One view of the page: a bordered box with its title."""
    style = {**_SECTION, "display": "none"} if hidden else _SECTION
    return html.Div([html.H3(title), *children], style=style, id=view_id)


def runs_table(state: AppState) -> html.Table:
    """Model, probes, dataset and time of every run in the runs directory."""
    cols = ("run", "model", "probes", "dataset", "created", "results", "status")
    rows = []
    for name in state.catalog.names():
        try:
            s = state.catalog.summary(name)
        except Exception as e:  # a broken run.json: list it with its problem instead of failing the page
            s = {"run": name, "model": failure_message(e), "status": "unreadable"}
        rows.append(html.Tr([html.Td(str(s.get(c, "")), style=_CELL) for c in cols]))
    return html.Table(
        [html.Thead(html.Tr([html.Th(c, style=_CELL) for c in cols])), html.Tbody(rows)],
        id=ids.RUNS_TABLE,
        style={"borderCollapse": "collapse", "fontSize": "90%"},
    )


def build_layout(state: AppState) -> html.Div:
    names = state.catalog.names()
    return html.Div(
        style={"fontFamily": "sans-serif", "maxWidth": "1200px", "margin": "0 auto"},
        children=[
            html.H2("attnlab"),
            dcc.Store(id=ids.SELECTED_HEAD, data=None),
            _section(
                "Runs",
                ids.RUNS_VIEW,
                [
                    runs_table(state),
                    html.Div(
                        [
                            "run: ",
                            dcc.Dropdown(
                                id=ids.RUN_SELECT,
                                options=[{"label": n, "value": n} for n in names],
                                value=names[0] if names else None,
                                clearable=False,
                                style=_inline("400px"),
                            ),
                        ],
                        style={"marginTop": "8px"},
                    ),
                    html.Div(
                        [
                            "compare with: ",
                            dcc.Dropdown(
                                id=ids.COMPARE_SELECT,
                                options=[{"label": n, "value": n} for n in names],
                                value=None,
                                clearable=True,
                                placeholder="(none: one run)",
                                style=_inline("400px"),
                            ),
                        ],
                        style={"marginTop": "4px"},
                    ),
                    html.Div(
                        id=ids.RUN_INFO,
                        style={"fontSize": "90%", "marginTop": "4px"},
                        children=""
                        if names
                        else f"no runs in {state.catalog.runs_dir.name}/ yet: write one with `attnlab scan --out`",
                    ),
                ],
            ),
            _section(
                "Head map",
                ids.HEAD_VIEW,
                [
                    html.Div(["score: ", dcc.Dropdown(id=ids.HEAD_RESULT, clearable=False, style=_inline("400px"))]),
                    dcc.Graph(id=ids.HEAD_MAP, config={"displaylogo": False}),
                    html.Div(id=ids.HEAD_LABEL, children="no head selected (click a cell)"),
                    html.Div(id=ids.HEAD_STATUS, style=_STATUS),
                ],
            ),
            _section(
                "Attention pattern",
                ids.PATTERN_VIEW,
                [
                    html.Div(
                        [
                            "prompt: ",
                            dcc.Dropdown(id=ids.PROMPT_SELECT, clearable=False, style=_inline("250px")),
                            " queries from ",
                            dcc.Input(
                                id=ids.WINDOW_START,
                                type="number",
                                min=0,
                                value=0,
                                debounce=True,
                                style={"width": "80px"},
                            ),
                            " count ",
                            dcc.Input(
                                id=ids.WINDOW_SIZE,
                                type="number",
                                min=1,
                                value=None,
                                placeholder="all",
                                debounce=True,
                                style={"width": "80px"},
                            ),
                            dcc.RadioItems(
                                id=ids.PATTERN_MODE,
                                options=[
                                    {"label": " pattern", "value": "pattern"},
                                    {"label": " query row", "value": "row"},
                                ],
                                value="pattern",
                                inline=True,
                                style={"display": "inline-block", "marginLeft": "12px"},
                                inputStyle={"marginLeft": "8px"},
                            ),
                            " row ",
                            dcc.Input(
                                id=ids.QUERY_ROW,
                                type="number",
                                value=None,
                                placeholder="last",
                                debounce=True,
                                style={"width": "80px"},
                            ),
                            html.Span(" computing…", id=ids.PATTERN_BUSY, style={"display": "none", "color": "#06c"}),
                        ]
                    ),
                    dcc.Textarea(
                        id=ids.CUSTOM_PROMPT,
                        placeholder=(
                            "or type a prompt here choose 'typed prompt' and press 'run typed prompt' "
                            f"(at most {state.live.max_chars} characters)"
                        ),
                        maxLength=state.live.max_chars,
                        style={"width": "100%", "height": "60px"},
                    ),
                    html.Button("run typed prompt", id=ids.RUN_PROMPT, n_clicks=0),
                    dcc.Loading(
                        dcc.Graph(
                            id=ids.PATTERN,
                            config={"displaylogo": False},
                            style={"height": f"{GRAPH_HEIGHTS[ids.PATTERN]}px"},
                        ),
                        id=ids.PATTERN_LOADING,
                        type="default",
                    ),
                    html.Div(id=ids.PATTERN_STATUS, style=_STATUS),
                ],
            ),
            _section(
                "Tokens",
                ids.TOKENS_VIEW,
                [
                    html.Div(
                        [
                            "token score: ",
                            dcc.Dropdown(id=ids.TOKEN_RESULT, clearable=False, style=_inline("400px")),
                            " from token ",
                            dcc.Input(
                                id=ids.TOKEN_START,
                                type="number",
                                min=0,
                                value=0,
                                placeholder=f"0 (pages of {TOKEN_PAGE})",
                                debounce=True,
                                style={"width": "90px"},
                            ),
                        ]
                    ),
                    dcc.Graph(id=ids.TOKEN_STRIP, config={"displaylogo": False}),
                    html.Div(id=ids.TOKEN_STATUS, style=_STATUS),
                ],
            ),
            _section(
                "Vision",
                ids.VISION_VIEW,
                [
                    html.Div(
                        [
                            "image: ",
                            dcc.Dropdown(id=ids.VISION_SOURCE, clearable=False, style=_inline("250px")),
                            dcc.Upload(
                                html.Button("upload an image"),
                                id=ids.VISION_UPLOAD,
                                max_size=MAX_UPLOAD_BYTES,
                                accept="image/*",
                                multiple=False,
                                style={"display": "inline-block", "marginLeft": "12px"},
                            ),
                            html.Span(" computing…", id=ids.VISION_BUSY, style={"display": "none", "color": "#06c"}),
                        ]
                    ),
                    html.Div(
                        "question asked with an uploaded image (the run's images use their own questions):",
                        style={"fontSize": "90%", "marginTop": "6px"},
                    ),
                    dcc.Input(
                        id=ids.VISION_QUESTION,
                        type="text",
                        value=UPLOAD_QUESTION,
                        debounce=True,
                        maxLength=500,
                        style={"width": "100%"},
                        placeholder="question for an uploaded image (with <image>)",
                    ),
                    dcc.Graph(
                        id=ids.VISION_FIGURE,
                        config={"displaylogo": False},
                        style={"height": f"{GRAPH_HEIGHTS[ids.VISION_FIGURE]}px"},
                    ),
                    html.Div(id=ids.VISION_STATUS, style=_STATUS),
                ],
                hidden=True,
            ),
            *explore_views(state),
            interventions_view(state),
            _section(
                "Ablation scoring",
                ids.ABLATION_VIEW,
                [
                    html.Div(
                        [
                            dcc.RadioItems(
                                id=ids.ABL_SOURCE,
                                options=[
                                    {"label": " selected head", "value": "selected"},
                                    {"label": " top-k of the head score", "value": "top"},
                                ],
                                value="top",
                                inline=True,
                                style={"display": "inline-block"},
                                inputStyle={"marginLeft": "8px"},
                            ),
                            " k ",
                            dcc.Input(id=ids.ABL_K, type="number", min=1, max=MAX_K, value=3, style={"width": "60px"}),
                            " random seeds ",
                            dcc.Input(
                                id=ids.ABL_SEEDS, type="number", min=1, max=MAX_SEEDS, value=3, style={"width": "60px"}
                            ),
                            " metric: ",
                            dcc.Dropdown(id=ids.ABL_METRIC, clearable=False, style=_inline("260px")),
                            html.Button("run ablation", id=ids.ABL_RUN, n_clicks=0, style={"marginLeft": "12px"}),
                            html.Span(" running…", id=ids.ABL_BUSY, style={"display": "none", "color": "#06c"}),
                        ]
                    ),
                    dcc.Graph(id=ids.ABL_FIGURE, config={"displaylogo": False}),
                    html.Div(id=ids.ABL_TABLE, style={"fontSize": "90%"}),
                    html.Div(id=ids.ABL_STATUS, style=_STATUS),
                ],
            ),
        ],
    )


def interventions_view(state: AppState) -> html.Div:
    """Method (from the intervention registry and the runs directory's fitted interventions, read on each page
    load), k=v parameters, prompt, expected answer."""
    options = method_options(state.catalog)
    first = options[0]["value"] if options else None
    return _section(
        "Interventions",
        ids.IV_VIEW,
        [
            html.Div(
                [
                    "method: ",
                    dcc.Dropdown(
                        id=ids.IV_METHOD, options=options, value=first, clearable=False, style=_inline("320px")
                    ),
                    " parameters (k=v, space-separated): ",
                    dcc.Input(
                        id=ids.IV_PARAMS,
                        type="text",
                        value=DEFAULT_PARAMS.get(first, ""),
                        maxLength=MAX_PARAMS_CHARS,
                        placeholder="e.g. beta=0.4 heads=[[3,0],[3,1]]",
                        style={"width": "380px"},
                    ),
                ]
            ),
            html.Div(id=ids.IV_INFO, style={"fontSize": "85%", "color": "#555", "marginTop": "4px"}),
            dcc.Textarea(
                id=ids.IV_PROMPT,
                placeholder=f"prompt run without and with the intervention (at most {state.live.max_chars} characters)",
                maxLength=state.live.max_chars,
                style={"width": "100%", "height": "60px", "marginTop": "6px"},
            ),
            html.Div(
                [
                    "expected answer (optional): ",
                    dcc.Input(
                        id=ids.IV_ANSWER,
                        type="text",
                        value="",
                        maxLength=200,
                        placeholder="default: the baseline's top token",
                        style={"width": "260px"},
                    ),
                    html.Button("run intervention", id=ids.IV_RUN, n_clicks=0, style={"marginLeft": "12px"}),
                    html.Span(" running…", id=ids.IV_BUSY, style={"display": "none", "color": "#06c"}),
                ]
            ),
            html.Div(id=ids.IV_OUTPUTS, style={"marginTop": "6px"}),
            dcc.Graph(
                id=ids.IV_FIGURE, config={"displaylogo": False}, style={"height": f"{GRAPH_HEIGHTS[ids.IV_FIGURE]}px"}
            ),
            html.Div(id=ids.IV_STATUS, style=_STATUS),
        ],
    )
