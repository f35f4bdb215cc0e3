"""Runs view: picking a run fills the result and prompt choices of the other views."""

from __future__ import annotations

from dash import Input, Output

from attnlab.apps import ids
from attnlab.apps.state import AppState, failure_message

TYPED = "typed"


def _options(names: list[str]) -> list[dict]:
    return [{"label": n, "value": n} for n in names]


def run_selected(run_name, state: AppState) -> tuple:
    """-> (info line, head-result options, head-result value, token-result options, token-result value,
    prompt options, prompt value). A name that is not a run of the catalog yields a message and empty choices."""
    empty = ([], None, [], None, [{"label": "typed prompt", "value": TYPED}], TYPED)
    if run_name is None:
        return ("", *empty)
    try:
        run = state.catalog.open(run_name)
    except Exception as e:
        return (failure_message(e), *empty)
    info = run.info
    model = info.get("model", {})
    ds = info.get("dataset", {})
    heads = run.names("head_scores")
    toks = run.names("token_scores")
    n_prompts = int(ds.get("n_prompts", 0) or 0)
    prompts = [{"label": f"run prompt {i}", "value": str(i)} for i in range(n_prompts)] + [
        {"label": "typed prompt", "value": TYPED}
    ]
    line = (
        f"{model.get('name')} ({model.get('architecture')}, {model.get('n_layers')} layers x {model.get('n_heads')} "
        f"heads), dataset {ds.get('name')}, created {info.get('created')}"
    )
    return (
        line,
        _options(heads),
        heads[0] if heads else None,
        _options(toks),
        toks[0] if toks else None,
        prompts,
        prompts[0]["value"],
    )


def register(app, state: AppState) -> None:
    app.callback(
        Output(ids.RUN_INFO, "children"),
        Output(ids.HEAD_RESULT, "options"),
        Output(ids.HEAD_RESULT, "value"),
        Output(ids.TOKEN_RESULT, "options"),
        Output(ids.TOKEN_RESULT, "value"),
        Output(ids.PROMPT_SELECT, "options"),
        Output(ids.PROMPT_SELECT, "value"),
        Input(ids.RUN_SELECT, "value"),
    )(lambda run_name: run_selected(run_name, state))
