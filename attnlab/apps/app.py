"""``create_app(runs_dir)`` -> the attnlab Dash app over the runs in a directory. Nothing happens at import time.

Serve it with ``attnlab app --runs DIR`` (127.0.0.1 by default) or ``create_app(DIR).run()``.
"""

from __future__ import annotations

from pathlib import Path

import dash
from dash import html

from attnlab.apps import guard
from attnlab.apps.callbacks import register_all
from attnlab.apps.catalog import RunCatalog
from attnlab.apps.layout import app_shell, build_layout
from attnlab.apps.live import LiveModels
from attnlab.apps.state import AppState
from attnlab.errors import AttnlabError

MAX_BODY_BYTES = 5_000_000  # request bodies: a 2 MB image upload as base64 plus the callback's other inputs


def create_app(
    runs_dir: str | Path,
    *,
    live_model: LiveModels | None = None,
    max_pattern_size: int = 192,
    host: str = "127.0.0.1",
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
):
    """Build the app.

    Parameters
    ----------
    runs_dir : directory whose child directories are runs written by ``attnlab scan --out``
    host : the address it is served on: requests must name it (or a loopback name) in their Host header
    token : access token every request must carry (``?token=`` once, then a cookie); required by ``attnlab app``
        for any host beyond loopback (``attnlab.apps.guard``)
    max_body_bytes : largest request body accepted (HTTP 413 beyond)
    live_model : LiveModels or None
        Runs models for the attention pattern view (default: a new ``LiveModels`` loading with ``attnlab.load``).
        Pass one to share loaded models, change the prompt limits, or preload a model.
    max_pattern_size : most rows/columns of an attention pattern drawn (longer prompts are downsampled)
    """

    state = AppState(
        catalog=RunCatalog.at(runs_dir), live=live_model or LiveModels(), max_pattern_size=max_pattern_size
    )
    # The page is the shell (theme, URL) and a container that ``callbacks.shell`` fills from the URL on each page
    # load; the full layout is given for validation so every callback's ids are checked when the app is built.
    app = dash.Dash(__name__, title="attnlab", serve_locally=True, update_title=None)
    app.layout = app_shell
    app.validation_layout = html.Div([app_shell(), build_layout(state)])
    register_all(app, state)
    if not guard.is_loopback(host) and token is None:
        raise AttnlabError(f"serving on {host} needs an access token (create_app(..., token=guard.new_token()))")
    guard.install(app.server, hosts=guard.allowed_hosts(host), token=token, max_body_bytes=max_body_bytes)
    app.attnlab_state = state  # for tests and embedding; the callbacks got it explicitly
    return app


def serve(runs_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Run the app with Flask's server (no debug mode: errors never reach the page as tracebacks)."""
    token = None if guard.is_loopback(host) else guard.new_token()
    app = create_app(runs_dir, host=host, token=token)
    if token is not None:
        print(f"attnlab app: open http://{host}:{port}/?token={token} (the token is required on every request)")
    app.run(host=host, port=port, debug=False)
