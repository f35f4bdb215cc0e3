"""The workbench shell: the page rendered from the URL, the URL kept in step with the view, the theme, graphs that
hide while empty, the model card and prompt preview of the left panel, and the runs table.

The URL's query string holds ``run``, ``result``, ``head`` (``L3H7``), ``prompt``, ``tab``, ``compare`` and the
census axes ``x`` / ``y``. The page is built from it once per page load (``layout.build_layout``); from then on
every change of those controls rewrites it (``view_query``), so a reload or a bookmark reopens the same view.
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlencode, urlsplit

from dash import Input, Output, State, html
from dash.exceptions import PreventUpdate

from attnlab.apps import ids
from attnlab.apps.components import GRAPH_HINTS, GRAPH_STYLE
from attnlab.apps.state import AppState, failure_message

QUERY_KEYS = ("run", "result", "head", "prompt", "tab", "compare", "x", "y")


def parse_query(search_or_href: str | None) -> dict[str, str]:
    """``?run=a&head=L1H2`` (or a whole URL) -> ``{"run": "a", "head": "L1H2"}``: known keys, first value each,
    at most 200 characters (anything else in the query is ignored)."""
    if not search_or_href:
        return {}
    query = urlsplit(str(search_or_href)).query if "?" in str(search_or_href) else ""
    parsed = parse_qs(query, keep_blank_values=False)
    return {k: v[0][:200] for k, v in parsed.items() if k in QUERY_KEYS and v}


def view_query(run, result, head, prompt, tab, compare=None, x=None, y=None) -> str:
    """The query string of a view (empty parts left out). The page builds the same string in the browser
    (``assets/attnlab.js``, ``query``); a browser test checks they agree."""
    parts = {
        "run": run,
        "result": result,
        "head": f"L{head['layer']}H{head['head']}" if isinstance(head, dict) and "layer" in head else None,
        "prompt": prompt,
        "tab": tab,
        "compare": compare,
        "x": x,
        "y": y,
    }
    return "?" + urlencode({k: v for k, v in parts.items() if v not in (None, "")})


def render_page(pathname, search, current, state: AppState):
    """The page for the URL the browser opened, built once (later URL changes are the view's own updates)."""
    if pathname is None or current:
        raise PreventUpdate
    from attnlab.apps.layout import build_layout

    return build_layout(state, parse_query(f"?{str(search or '').lstrip('?')}"))


def model_card(run_name, state: AppState):
    """The run's model (architecture, layers x heads, KV heads), dataset and time, as a small table."""
    if run_name is None:
        return None
    try:
        info = state.catalog.open(run_name).info
    except Exception as e:
        return failure_message(e)
    m, ds = info.get("model", {}) or {}, info.get("dataset", {}) or {}
    kv = m.get("n_kv_heads")
    probes = [p.get("name", "?") for p in info.get("probes", []) or []]
    rows = [
        ("architecture", m.get("architecture")),
        ("layers x heads", f"{m.get('n_layers')} x {m.get('n_heads')}"),
        ("KV heads", kv if kv is not None else "not recorded"),
        ("modality", m.get("modality")),
        ("dataset", f"{ds.get('name')}, {ds.get('n_prompts', '?')} prompts" if ds else None),
        ("probes", f"{len(probes)}: {', '.join(probes)}" if probes else None),
        ("created", str(info.get("created") or "").replace("T", " ")[:16] or None),
    ]
    return html.Table([html.Tr([html.Td(k), html.Td(str(v))]) for k, v in rows if v not in (None, "", "None")])


def prompt_preview(run_name, choice, typed, state: AppState) -> str:
    """The chosen prompt's text (the run's kept text, or the typed one), cut to 600 characters."""
    from attnlab.apps.run_inputs import TYPED

    if choice == TYPED:
        text = str(typed or "").strip() or "(type the prompt in the Pattern tab)"
    else:
        try:
            stored = state.catalog.open(run_name).inputs()
            i = int(choice)
            if stored is None or not 0 <= i < len(stored):
                return ""
            text = stored.texts[i] if stored.texts is not None else f"{len(stored.token_ids[i])} token ids"
        except Exception:
            return ""
    text = str(text)
    return text if len(text) <= 600 else text[:600] + "…"


def run_from_row(selected_rows, current):
    """A click on a row of the runs table opens that run."""
    if selected_rows:
        run = selected_rows[0].get("run")
        if run and run != current:
            return run
    raise PreventUpdate


def _shown_js(graph_id: str) -> str:
    hint, style = json.dumps(GRAPH_HINTS.get(graph_id, "")), json.dumps(GRAPH_STYLE.get(graph_id, {}))
    return f"function(fig) {{ return window.dash_clientside.attnlab.shown(fig, {hint}, {style}); }}"


def register(app, state: AppState) -> None:
    # pathname, not href: the view's own query updates leave the path alone, so they do not re-run this
    app.callback(
        Output(ids.PAGE, "children"),
        Input(ids.URL, "pathname"),
        State(ids.URL, "search"),
        State(ids.PAGE, "children"),
    )(lambda pathname, search, current: render_page(pathname, search, current, state))
    # in the browser (no request per head step): the same query string as ``view_query``
    app.clientside_callback(
        "function(run, result, head, prompt, tab, compare, x, y, current) {"
        " return window.dash_clientside.attnlab.query([run, result, head, prompt, tab, compare, x, y], current); }",
        Output(ids.URL, "search"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.HEAD_RESULT, "value"),
        Input(ids.SELECTED_HEAD, "data"),
        Input(ids.PROMPT_SELECT, "value"),
        Input(ids.TABS, "value"),
        Input(ids.COMPARE_SELECT, "value"),
        Input(ids.CENSUS_X, "value"),
        Input(ids.CENSUS_Y, "value"),
        State(ids.URL, "search"),
    )
    app.clientside_callback(
        "function(dark) { return window.dash_clientside.attnlab.theme(dark); }",
        Output(ids.THEME, "forceColorScheme"),
        Input(ids.THEME_TOGGLE, "checked"),
    )
    for gid in GRAPH_HINTS:
        app.clientside_callback(
            _shown_js(gid), Output(gid, "style"), Output(f"{gid}-hint", "children"), Input(gid, "figure")
        )
    app.callback(Output(ids.MODEL_CARD, "children"), Input(ids.RUN_SELECT, "value"))(
        lambda run_name: model_card(run_name, state)
    )
    app.callback(
        Output(ids.PROMPT_PREVIEW, "children"),
        Input(ids.RUN_SELECT, "value"),
        Input(ids.PROMPT_SELECT, "value"),
        Input(ids.RUN_PROMPT, "n_clicks"),
        State(ids.CUSTOM_PROMPT, "value"),
    )(lambda run_name, choice, _n, typed: prompt_preview(run_name, choice, typed, state))
    app.callback(
        Output(ids.RUN_SELECT, "value"),
        Input(ids.RUNS_TABLE, "selectedRows"),
        State(ids.RUN_SELECT, "value"),
        prevent_initial_call=True,
    )(run_from_row)


__all__ = ["parse_query", "view_query", "model_card", "prompt_preview", "register"]
