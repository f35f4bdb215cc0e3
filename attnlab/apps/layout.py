"""The page: a left panel (run picker, model card, prompt picker, selected head) and tabs (Runs, Heads with the
census, Pattern, Explore, Tokens, Interventions, Ablation, Vision for VLM runs). Ids come from ``ids.py``.

The shell is Dash Mantine Components (one theme, light and dark); the controls inside the views are Dash's own
components, themed through the CSS variables Dash 4 gives them (``assets/attnlab.css`` binds them to Mantine's).
Tables users sort and filter are Dash AG Grid.

``app_shell`` is the static page: a ``dcc.Location`` and an empty container. ``build_layout(state, query)`` fills
the container once per page load, from the URL's query string (``callbacks.shell``), so new runs appear on reload
and a bookmarked URL reopens its view.
"""

from __future__ import annotations

from typing import Any

import dash_mantine_components as dmc
from dash import dcc, html

from attnlab.apps import ids
from attnlab.apps.ablation import MAX_K, MAX_SEEDS
from attnlab.apps.callbacks.tokens import TOKEN_PAGE
from attnlab.apps.components import NOTE, ROW, STATUS, card, graph, grid, inline, label
from attnlab.apps.explore import explore_views
from attnlab.apps.interventions import DEFAULT_PARAMS, MAX_PARAMS_CHARS, method_options
from attnlab.apps.state import AppState, failure_message
from attnlab.apps.vision import MAX_UPLOAD_BYTES, UPLOAD_QUESTION

TABS = ("runs", "heads", "pattern", "explore", "tokens", "interventions", "ablation", "vision")
TAB_LABELS = {
    "runs": "Runs",
    "heads": "Heads",
    "pattern": "Pattern",
    "explore": "Explore",
    "tokens": "Tokens",
    "interventions": "Interventions",
    "ablation": "Ablation",
    "vision": "Vision",
}
DEFAULT_TAB = "heads"


def runs_table(state: AppState):
    """Model, probes, dataset, time and status of every run in the runs directory; a row click opens the run."""
    cols = ["run", "model", "probes", "dataset", "created", "results", "status"]
    rows = []
    for name in state.catalog.names():
        try:
            s = state.catalog.summary(name)
        except Exception as e:  # a broken run.json: list it with its problem instead of failing the page
            s = {"run": name, "model": failure_message(e), "status": "unreadable"}
        rows.append({c: str(s.get(c, "")) for c in cols})
    return grid(ids.RUNS_TABLE, rows, cols, height=min(560, 90 + 42 * max(1, len(rows))))


def app_shell() -> dmc.MantineProvider:
    """The static page: the theme, the URL and the container ``build_layout`` is rendered into."""
    return dmc.MantineProvider(
        id=ids.THEME,
        forceColorScheme="light",
        children=[
            dcc.Location(id=ids.URL, refresh=False),
            dcc.Store(id=ids.KEY_STEP, data=None),
            html.Div(id=ids.PAGE),
        ],
    )


def _want(query: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The view a URL asks for, checked against what exists (anything else falls back to the defaults)."""
    run = query.get("run")
    tab = query.get("tab")
    return {
        "run": run if run in names else (names[0] if names else None),
        "compare": query.get("compare") if query.get("compare") in names else None,
        "tab": tab if tab in TABS else DEFAULT_TAB,
        "result": query.get("result"),
        "prompt": query.get("prompt"),
        "head": query.get("head"),
        "x": query.get("x"),
        "y": query.get("y"),
    }


def build_layout(state: AppState, query: dict[str, Any] | None = None) -> dmc.AppShell:
    names = state.catalog.names()
    want = _want(query or {}, names)
    return dmc.AppShell(
        [
            dcc.Store(id=ids.SELECTED_HEAD, data=None),
            dcc.Store(id=ids.GRID_SHAPE, data=None),
            dcc.Store(id=ids.URL_INIT, data={**want, "pending": True} if query else None),
            dmc.AppShellHeader(_header(), px="md"),
            dmc.AppShellNavbar(_left_panel(state, names, want), p="md"),
            dmc.AppShellMain(_tabs(state, names, want)),
        ],
        header={"height": 52},
        navbar={"width": 320, "breakpoint": "sm"},
        padding="md",
    )


def _header() -> dmc.Group:
    keys = html.Span(
        [
            "keys: ",
            dmc.Kbd("←"),
            " ",
            dmc.Kbd("→"),
            " head, ",
            dmc.Kbd("↑"),
            " ",
            dmc.Kbd("↓"),
            " layer (or h l k j)",
        ],
        className="attnlab-keys",
    )
    return dmc.Group(
        [
            dmc.Group([dmc.Title("attnlab", order=3), dmc.Text("attention workbench", c="dimmed", size="sm")]),
            dmc.Group(
                [
                    keys,
                    dmc.Switch(
                        id=ids.THEME_TOGGLE,
                        label="dark",
                        checked=False,
                        persistence=True,
                        persistence_type="local",
                    ),
                ],
                gap="lg",
            ),
        ],
        justify="space-between",
        h="100%",
    )


def _left_panel(state: AppState, names: list[str], want: dict) -> list:
    options = [{"label": n, "value": n} for n in names]
    step = lambda text, bid, title: dmc.Button(
        text, id=bid, variant="default", size="compact-sm", attributes={"title": title}
    )
    return [
        dmc.ScrollArea(
            [
                label("run"),
                dcc.Dropdown(
                    id=ids.RUN_SELECT,
                    options=options,
                    value=want["run"],
                    clearable=False,
                    searchable=True,
                    placeholder="search the runs",
                ),
                label("compare with"),
                dcc.Dropdown(
                    id=ids.COMPARE_SELECT,
                    options=options,
                    value=want["compare"],
                    clearable=True,
                    placeholder="(none: one run)",
                ),
                html.Div(
                    id=ids.RUN_INFO,
                    className="attnlab-runinfo",
                    children=""
                    if names
                    else f"no runs in {state.catalog.runs_dir.name}/ yet: write one with `attnlab scan --out`",
                ),
                html.Div(id=ids.MODEL_CARD, className="attnlab-card"),
                label("prompt"),
                dcc.Dropdown(id=ids.PROMPT_SELECT, clearable=False, optionHeight=50, maxHeight=400),
                html.Div(id=ids.PROMPT_PREVIEW, className="attnlab-preview"),
                label("selected head"),
                dmc.Text(id=ids.HEAD_LABEL, children="no head selected (click a cell)", fw=600),
                dmc.Group(
                    [
                        step("← head", ids.HEAD_PREV, "previous head (← or h)"),
                        step("head →", ids.HEAD_NEXT, "next head (→ or l)"),
                        step("↑ layer", ids.LAYER_PREV, "previous layer (↑ or k)"),
                        step("layer ↓", ids.LAYER_NEXT, "next layer (↓ or j)"),
                    ],
                    gap=4,
                    mt=4,
                ),
            ],
            h="100%",
        )
    ]


def _tabs(state: AppState, names: list[str], want: dict) -> dmc.Tabs:
    panels = {
        "runs": [card("Runs", ids.RUNS_VIEW, [runs_table(state)], note="click a row to open the run")],
        "heads": _heads_tab(want),
        "pattern": [_pattern_view(state)],
        "explore": explore_views(state),
        "tokens": [_tokens_view()],
        "interventions": [interventions_view(state)],
        "ablation": [_ablation_view()],
        "vision": [_vision_view()],
    }
    tabs = [
        dmc.TabsTab(
            TAB_LABELS[t],
            value=t,
            id=f"tab-{t}",
            style={"display": "none"} if t == "vision" else None,
        )
        for t in TABS
    ]
    return dmc.Tabs(
        [dmc.TabsList(tabs, mb="md")] + [dmc.TabsPanel(panels[t], value=t) for t in TABS],
        id=ids.TABS,
        value=want["tab"],
        keepMounted=True,
        activateTabWithKeyboard=False,
    )


def _heads_tab(want: dict) -> list:
    head_map = card(
        "Head map",
        ids.HEAD_VIEW,
        [
            html.Div(
                [label("score"), dcc.Dropdown(id=ids.HEAD_RESULT, clearable=False, style=inline("360px"))],
                style=ROW,
            ),
            dmc.Grid(
                [
                    dmc.GridCol(graph(ids.HEAD_MAP), span=8),
                    dmc.GridCol(
                        [
                            html.Div("heads ranked (click a row to select it)", style=NOTE),
                            grid(ids.TOP_HEADS, [], ["head", "score", "rank"], height=420),
                        ],
                        span=4,
                    ),
                ]
            ),
            html.Div(id=ids.HEAD_STATUS, style=STATUS),
        ],
    )
    census = dmc.Paper(
        [
            dmc.Title("Census", order=4, mb=4),
            html.Div(
                "every head on two statistics, coloured by layer; hover for all its statistics, click for its "
                "pattern on its top examples",
                style=NOTE,
            ),
            html.Div(
                [
                    label("x"),
                    dcc.Dropdown(id=ids.CENSUS_X, clearable=False, value=want.get("x"), style=inline("260px")),
                    label("y"),
                    dcc.Dropdown(id=ids.CENSUS_Y, clearable=False, value=want.get("y"), style=inline("260px")),
                ],
                style=ROW,
            ),
            dmc.Grid([dmc.GridCol(graph(ids.CENSUS_FIGURE), span=6), dmc.GridCol(graph(ids.CENSUS_OTHER), span=6)]),
            dcc.Loading(graph(ids.CENSUS_EXAMPLES), type="dot"),
            html.Div(id=ids.CENSUS_STATUS, style=STATUS),
        ],
        id=ids.CENSUS_VIEW,
        withBorder=True,
        radius="md",
        p="md",
        mb="md",
        style={"display": "none"},
    )
    return [head_map, census]


def _pattern_view(state: AppState) -> dmc.Paper:
    number = lambda i, **kw: dcc.Input(id=i, type="number", debounce=True, style={"width": "80px"}, **kw)
    return card(
        "Attention pattern",
        ids.PATTERN_VIEW,
        [
            html.Div(
                [
                    label("queries from"),
                    number(ids.WINDOW_START, min=0, value=0),
                    label("count"),
                    number(ids.WINDOW_SIZE, min=1, value=None, placeholder="all"),
                    dcc.RadioItems(
                        id=ids.PATTERN_MODE,
                        options=[
                            {"label": " pattern", "value": "pattern"},
                            {"label": " query row", "value": "row"},
                        ],
                        value="pattern",
                        inline=True,
                        inputStyle={"marginLeft": "8px"},
                    ),
                    label("row"),
                    number(ids.QUERY_ROW, value=None, placeholder="last"),
                    dcc.Checklist(
                        id=ids.PATTERN_LOG,
                        options=[{"label": " log colour scale (sinks)", "value": "log"}],
                        value=[],
                        inline=True,
                    ),
                    html.Span(" computing…", id=ids.PATTERN_BUSY, style={"display": "none", "color": "#06c"}),
                ],
                style=ROW,
            ),
            html.Div(
                "long prompts: set 'queries from' and 'count' to a window (every token labelled), or leave them "
                "to see the whole prompt in blocks; hover any cell for its full tokens",
                style=NOTE,
            ),
            dcc.Loading(graph(ids.PATTERN), id=ids.PATTERN_LOADING, type="default"),
            html.Div(id=ids.PATTERN_STATUS, style=STATUS),
            dmc.Divider(my="sm"),
            html.Div("or type a prompt (pick 'typed prompt' in the left panel, then run it)", style=NOTE),
            dcc.Textarea(
                id=ids.CUSTOM_PROMPT,
                placeholder=(
                    "type a prompt here, choose 'typed prompt' and press 'run typed prompt' "
                    f"(at most {state.live.max_chars} characters)"
                ),
                maxLength=state.live.max_chars,
                style={"width": "100%", "height": "60px"},
            ),
            dmc.Button("run typed prompt", id=ids.RUN_PROMPT, n_clicks=0, size="compact-sm", mt=4),
        ],
    )


def _tokens_view() -> dmc.Paper:
    return card(
        "Tokens",
        ids.TOKENS_VIEW,
        [
            html.Div(
                [
                    label("token score"),
                    dcc.Dropdown(id=ids.TOKEN_RESULT, clearable=False, style=inline("400px")),
                    label("from token"),
                    dcc.Input(
                        id=ids.TOKEN_START,
                        type="number",
                        min=0,
                        value=0,
                        placeholder=f"0 (pages of {TOKEN_PAGE})",
                        debounce=True,
                        style={"width": "90px"},
                    ),
                ],
                style=ROW,
            ),
            *graph(ids.TOKEN_STRIP),
            html.Div(id=ids.TOKEN_STATUS, style=STATUS),
            *graph(ids.TOKENS_HEAD),
        ],
    )


def _vision_view() -> dmc.Paper:
    return card(
        "Vision",
        ids.VISION_VIEW,
        [
            html.Div(
                [
                    label("image"),
                    dcc.Dropdown(id=ids.VISION_SOURCE, clearable=False, style=inline("250px")),
                    dcc.Upload(
                        dmc.Button("upload an image", variant="default", size="compact-sm"),
                        id=ids.VISION_UPLOAD,
                        max_size=MAX_UPLOAD_BYTES,
                        accept="image/*",
                        multiple=False,
                        style={"display": "inline-block"},
                    ),
                    html.Span(" computing…", id=ids.VISION_BUSY, style={"display": "none", "color": "#06c"}),
                ],
                style=ROW,
            ),
            html.Div(
                "question asked with an uploaded image (the run's images use their own questions):",
                style={**NOTE, "marginTop": "6px"},
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
            *graph(ids.VISION_FIGURE),
            html.Div(id=ids.VISION_STATUS, style=STATUS),
        ],
    )


def _ablation_view() -> dmc.Paper:
    return card(
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
                        inputStyle={"marginLeft": "8px"},
                    ),
                    label("k"),
                    dcc.Input(id=ids.ABL_K, type="number", min=1, max=MAX_K, value=3, style={"width": "60px"}),
                    label("random seeds"),
                    dcc.Input(id=ids.ABL_SEEDS, type="number", min=1, max=MAX_SEEDS, value=3, style={"width": "60px"}),
                    label("metric"),
                    dcc.Dropdown(id=ids.ABL_METRIC, clearable=False, style=inline("260px")),
                    dmc.Button("run ablation", id=ids.ABL_RUN, n_clicks=0, size="compact-sm"),
                    html.Span(" running…", id=ids.ABL_BUSY, style={"display": "none", "color": "#06c"}),
                ],
                style=ROW,
            ),
            *graph(ids.ABL_FIGURE),
            html.Div(id=ids.ABL_TABLE, style={"fontSize": "90%"}),
            html.Div(id=ids.ABL_STATUS, style=STATUS),
        ],
    )


def interventions_view(state: AppState) -> dmc.Paper:
    """Method (from the intervention registry and the runs directory's fitted interventions, read on each page
    load), k=v parameters, prompt, expected answer."""
    options = method_options(state.catalog)
    first = options[0]["value"] if options else None
    return card(
        "Interventions",
        ids.IV_VIEW,
        [
            html.Div(
                [
                    label("method"),
                    dcc.Dropdown(
                        id=ids.IV_METHOD, options=options, value=first, clearable=False, style=inline("320px")
                    ),
                    label("parameters (k=v, space-separated)"),
                    dcc.Input(
                        id=ids.IV_PARAMS,
                        type="text",
                        value=DEFAULT_PARAMS.get(first, ""),
                        maxLength=MAX_PARAMS_CHARS,
                        placeholder="e.g. beta=0.4 heads=[[3,0],[3,1]]",
                        style={"width": "380px"},
                    ),
                ],
                style=ROW,
            ),
            html.Div(id=ids.IV_INFO, style={**NOTE, "marginTop": "4px"}),
            dcc.Textarea(
                id=ids.IV_PROMPT,
                placeholder=f"prompt run without and with the intervention (at most {state.live.max_chars} characters)",
                maxLength=state.live.max_chars,
                style={"width": "100%", "height": "60px", "marginTop": "6px"},
            ),
            html.Div(
                [
                    label("expected answer (optional)"),
                    dcc.Input(
                        id=ids.IV_ANSWER,
                        type="text",
                        value="",
                        maxLength=200,
                        placeholder="default: the baseline's top token",
                        style={"width": "260px"},
                    ),
                    dmc.Button("run intervention", id=ids.IV_RUN, n_clicks=0, size="compact-sm"),
                    html.Span(" running…", id=ids.IV_BUSY, style={"display": "none", "color": "#06c"}),
                ],
                style=ROW,
            ),
            html.Div(id=ids.IV_OUTPUTS, style={"marginTop": "6px"}),
            *graph(ids.IV_FIGURE),
            html.Div(id=ids.IV_STATUS, style=STATUS),
        ],
    )
