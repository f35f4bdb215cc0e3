"""Runs view: picking a run fills the result and prompt choices of the other views."""

from __future__ import annotations

from dash import Input, Output, State

from attnlab.apps import ids
from attnlab.apps.catalog import model_label
from attnlab.apps.run_inputs import TYPED, prompt_options
from attnlab.apps.run_inputs import n_prompts as n_prompts_of
from attnlab.apps.state import AppState, failure_message, no_paths

MAX_PROMPT_OPTIONS = 500  # a run may claim any number of prompts: the dropdown lists this many at most
MAX_OPTIONS = 1000  # results of one kind listed at most


def _options(names: list[str]) -> list[dict]:
    return [{"label": n, "value": n} for n in names]


def run_selected(run_name, state: AppState, want: dict | None = None) -> tuple:
    """-> (info line, head-result options, head-result value, token-result options, token-result value,
    prompt options, prompt value). A name that is not a run of the catalog yields a message and empty choices.

    ``want``: the view the page's URL asked for (``URL_INIT``); when it names this run, its score and prompt are
    chosen instead of the first ones (where the run has them)."""
    empty = ([], None, [], None, [{"label": "typed prompt", "value": TYPED}], TYPED)
    if run_name is None:
        return ("", *empty)
    try:
        run = state.catalog.open(run_name)
    except Exception as e:
        return (failure_message(e), *empty)
    info = run.info
    model = info.get("model", {})
    heads = run.names("head_scores")[:MAX_OPTIONS]
    toks = run.names("token_scores")[:MAX_OPTIONS]
    n_prompts = n_prompts_of(run)
    shown = min(n_prompts, MAX_PROMPT_OPTIONS)
    prompts = prompt_options(run, MAX_PROMPT_OPTIONS)
    line = f"{model_label(model.get('name'))}: {model.get('n_layers')} layers x {model.get('n_heads')} heads"
    if shown < n_prompts:
        line += f"; the prompt list shows the first {shown:,} of its {n_prompts:,} prompts"
    if len(run.results) > 2 * MAX_OPTIONS:
        line += f"; the result lists show at most {MAX_OPTIONS:,} of each kind"
    if not run.complete:
        line += f" — {run.state_line()}"
    line = no_paths(line)
    result = heads[0] if heads else None
    prompt = prompts[0]["value"]
    if want and want.get("pending") and want.get("run") == run_name:
        if want.get("result") in heads:
            result = want["result"]
        if want.get("prompt") in {o["value"] for o in prompts}:
            prompt = want["prompt"]
    return (line, _options(heads), result, _options(toks), toks[0] if toks else None, prompts, prompt)


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
        State(ids.URL_INIT, "data"),
    )(lambda run_name, want: run_selected(run_name, state, want))
