"""The app refuses what does not belong to it (issue #18): foreign Host headers (DNS rebinding), requests without the
access token beyond loopback (including Dash's callback route), oversized bodies, runs and results that leave the
runs directory, malformed run.json files; it escapes token labels, caps what a callback sends, and offers only
finished fitted interventions. All through Flask's test client (no socket) except the browser check."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SHORT_SENTENCES

import attnlab
from attnlab import figures
from attnlab.apps import guard
from attnlab.apps.app import create_app
from attnlab.apps.callbacks import headmap, runs
from attnlab.apps.live import LiveModels
from attnlab.errors import AttnlabError
from attnlab.heads.results import HeadScores, TokenScores
from attnlab.heads.runs import Run


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, loaded):
    root = tmp_path_factory.mktemp("src")
    attnlab.scan(
        loaded("llama-gqa"), "first_token_sink,act_sinks", SHORT_SENTENCES[:2], out=root / "tiny", progress=False
    )
    return root / "tiny"


@pytest.fixture
def runs_dir(base_run, tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(base_run, root / "tiny")
    return root


def _app(runs_dir, **kw):
    return create_app(runs_dir, live_model=LiveModels(lambda name: pytest.fail("no model loads here")), **kw)


def _update_body(app, run_name="tiny"):
    """A valid /_dash-update-component body: the runs view's callback for ``run_name``."""
    from attnlab.apps import loadtest

    deps = app.server.test_client().get("/_dash-dependencies").get_json()
    return loadtest.callback_body(deps, "run-info.children", {"run-select.value": run_name}, ["run-select.value"])


def _page_body(app):
    """The /_dash-update-component body that renders the page for the URL ``/`` (``callbacks.shell``)."""
    from attnlab.apps import ids, loadtest

    deps = app.server.test_client().get("/_dash-dependencies").get_json()
    values = {f"{ids.URL}.pathname": "/", f"{ids.URL}.search": "", f"{ids.PAGE}.children": None}
    return loadtest.callback_body(deps, f"{ids.PAGE}.children", values, [f"{ids.URL}.pathname"])


# ---- Host header, access token, body size --------------------------------------------------------------------------


def test_only_loopback_host_names_are_served_by_default(runs_dir):
    client = _app(runs_dir).server.test_client()
    for host in ("127.0.0.1:8050", "localhost", "LOCALHOST.:80", "[::1]:8050", "127.0.0.2"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8050", "127.0.0.1.evil.example", "attacker.localhost.example"):
        r = client.get("/", headers={"Host": host})
        assert r.status_code == 403, host
        assert client.post("/_dash-update-component", headers={"Host": host}, json={}).status_code == 403


def test_a_named_host_accepts_its_name_and_loopback(runs_dir):
    client = _app(runs_dir, host="10.1.2.3", token="t0k").server.test_client()
    assert client.get("/?token=t0k", headers={"Host": "10.1.2.3:8050"}).status_code == 200
    assert client.get("/?token=t0k", headers={"Host": "rebound.example"}).status_code == 403


def test_non_loopback_serving_requires_a_token(runs_dir):
    with pytest.raises(AttnlabError, match="needs an access token"):
        _app(runs_dir, host="0.0.0.0")
    app = _app(runs_dir, host="0.0.0.0", token="s3cret-token")
    client = app.server.test_client()
    body = _update_body(_app(runs_dir))
    for path in ("/", "/_dash-layout", "/_dash-dependencies", "/favicon.ico"):
        assert client.get(path).status_code == 403, path
    assert client.post("/_dash-update-component", json=body).status_code == 403
    assert client.get("/?token=wrong").status_code == 403
    assert guard.TOKEN_COOKIE not in client.get("/?token=wrong").headers.get("Set-Cookie", "")
    first = client.get("/?token=s3cret-token")
    assert first.status_code == 200 and "HttpOnly" in first.headers["Set-Cookie"]
    assert "SameSite=Strict" in first.headers["Set-Cookie"]
    # the cookie now rides along: the page's own requests, Dash's callback route included, pass
    assert client.get("/_dash-layout").status_code == 200
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200 and "llama-gqa" in r.get_data(as_text=True)
    fresh = app.server.test_client()  # another browser without the cookie
    assert fresh.post("/_dash-update-component", json=body).status_code == 403
    assert (
        fresh.post("/_dash-update-component", json=body, headers={guard.TOKEN_HEADER: "s3cret-token"}).status_code
        == 200
    )


def test_cli_app_beyond_loopback_prints_a_token_url(runs_dir, monkeypatch, capsys):
    import dash

    from attnlab.cli import main

    served = {}
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: served.update(kw, app=self))
    assert main(["app", "--runs", str(runs_dir), "--host", "0.0.0.0", "--port", "8123"]) == 0
    out = capsys.readouterr().out
    token = out.split("?token=")[1].split()[0]
    assert len(token) >= 24 and served["host"] == "0.0.0.0"
    client = served["app"].server.test_client()
    assert client.get("/").status_code == 403 and client.get(f"/?token={token}").status_code == 200
    assert main(["app", "--runs", str(runs_dir)]) == 0  # loopback: no token
    assert "?token=" not in capsys.readouterr().out
    assert served["app"].server.test_client().get("/").status_code == 200


def test_request_bodies_are_bounded(runs_dir):
    client = _app(runs_dir, max_body_bytes=100_000).server.test_client()
    r = client.post("/_dash-update-component", data=b"x" * 200_000, content_type="application/json")
    assert r.status_code == 413
    big = _app(runs_dir).server.test_client()  # the default bound: a 50 MB body is refused, not read
    r = big.post("/_dash-update-component", data=b"{" + b" " * 50_000_000, content_type="application/json")
    assert r.status_code == 413


# ---- runs that leave the runs directory, malformed runs --------------------------------------------------------------


def test_result_keys_and_links_leaving_the_run_are_refused(runs_dir, tmp_path):
    """run.json naming ``../../outside/SECRET`` or an absolute path, a result file linked out of the run, run.json
    linked out: the app refuses each before opening anything outside, and its messages name no server path."""
    outside = tmp_path / "outside"
    attnlab_run = runs_dir / "tiny"
    shutil.copytree(attnlab_run, outside / "SECRET")
    state = _app(runs_dir).attnlab_state
    for key in ("../../outside/SECRET/first_token_sink", str(outside / "SECRET" / "first_token_sink")):
        index = json.loads((attnlab_run / "run.json").read_text())
        index["results"][key] = {"kind": "head_scores", "probe": "x", "description": ""}
        (runs_dir / "evil").mkdir(exist_ok=True)
        shutil.copy(attnlab_run / "first_token_sink.safetensors", runs_dir / "evil")
        (runs_dir / "evil" / "run.json").write_text(json.dumps(index))
        info, head_opts, *_ = runs.run_selected("evil", state)
        assert head_opts == [] and "is not a plain name" in info and str(tmp_path) not in info
        fig, msg = headmap.head_figure("evil", key, state)
        assert "is not a plain name" in msg and str(tmp_path) not in msg
    shutil.rmtree(runs_dir / "evil")
    link = runs_dir / "linked"
    shutil.copytree(attnlab_run, link)
    for suffix in (".json", ".safetensors"):
        (link / f"first_token_sink{suffix}").unlink()
        (link / f"first_token_sink{suffix}").symlink_to(outside / "SECRET" / f"first_token_sink{suffix}")
    fig, msg = headmap.head_figure("linked", "first_token_sink", state)
    assert "points outside the run directory" in msg and str(tmp_path) not in msg and len(fig.data) == 0
    (link / "run.json").unlink()
    (link / "run.json").symlink_to(outside / "SECRET" / "run.json")
    info, *_ = runs.run_selected("linked", state)
    assert "points outside the run directory" in info and str(tmp_path) not in info


@pytest.mark.parametrize(
    "field,value",
    [
        (("info",), "a string"),
        (("info", "model"), ["list"]),
        (("info", "model", "name"), 7),
        (("info", "dataset"), 3),
        (("info", "dataset", "n_prompts"), "twelve"),
        (("info", "dataset", "n_prompts"), -5),
        (("info", "probes"), "sinks"),
        (("info", "probes"), [1, 2]),
        (("info", "created"), {"y": 1}),
        (("results",), ["first_token_sink"]),
        (("results", "first_token_sink"), "head_scores"),
        (("pending",), "x"),
    ],
)
def test_malformed_run_json_is_listed_as_unreadable(runs_dir, field, value):
    """Wrong field types: a one-line message, the run listed as unreadable, no HTTP 500 anywhere."""
    index = json.loads((runs_dir / "tiny" / "run.json").read_text())
    target = index
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    (runs_dir / "tiny" / "run.json").write_text(json.dumps(index))
    app = _app(runs_dir)
    state = app.attnlab_state
    with pytest.raises(AttnlabError, match="run.json is malformed"):
        state.catalog.summary("tiny")
    info, head_opts, *_ = runs.run_selected("tiny", state)
    assert "run.json is malformed" in info and "\n" not in info and head_opts == []
    client = app.server.test_client()
    assert client.get("/_dash-layout").status_code == 200
    page = client.post("/_dash-update-component", json=_page_body(app))  # the page, rendered from the URL
    assert page.status_code == 200 and "unreadable" in page.get_data(as_text=True)
    assert client.get("/").status_code == 200
    assert client.post("/_dash-update-component", json=_update_body(app)).status_code == 200


# ---- caps on what a callback sends ----------------------------------------------------------------------------------


def test_a_huge_prompt_count_is_capped_and_said(runs_dir):
    (runs_dir / "tiny" / "inputs.json").unlink()  # a run written before runs kept their inputs: run.json's count
    index = json.loads((runs_dir / "tiny" / "run.json").read_text())
    index["info"]["dataset"].update(n_prompts=10**9, name="prose(n=1000000000,seed=0)")  # regenerable name
    (runs_dir / "tiny" / "run.json").write_text(json.dumps(index))
    app = _app(runs_dir)
    info, *_, prompt_opts, _ = runs.run_selected("tiny", app.attnlab_state)
    assert len(prompt_opts) == runs.MAX_PROMPT_OPTIONS + 1
    assert "the prompt list shows the first 500 of its 1,000,000,000 prompts" in info
    r = app.server.test_client().post("/_dash-update-component", json=_update_body(app))
    assert r.status_code == 200 and len(r.get_data()) < 200_000
    with pytest.raises(AttnlabError, match="more than the app regenerates"):
        app.attnlab_state.live.run_prompt_ids(app.attnlab_state.catalog.open("tiny").info, 3)


def test_kept_prompts_are_capped_and_said(runs_dir, monkeypatch):
    """A run that kept its inputs lists them from inputs.json, capped the same way."""
    monkeypatch.setattr(runs, "MAX_PROMPT_OPTIONS", 1)
    app = _app(runs_dir)
    info, *_, prompt_opts, _ = runs.run_selected("tiny", app.attnlab_state)
    assert [o["value"] for o in prompt_opts] == ["0", runs.TYPED]
    assert "the prompt list shows the first 1 of its 2 prompts" in info


def test_image_regeneration_is_capped():
    from attnlab.apps.vision import run_image_prompts

    info = {"dataset": {"name": "shapes-attribute(n=9999,seed=0)", "fingerprint": "0"}}
    with pytest.raises(AttnlabError, match="more than the app regenerates"):
        run_image_prompts(None, info)  # refused before any model or image is touched


def test_a_huge_head_grid_is_refused_with_a_message(runs_dir):
    run = Run.open(runs_dir / "tiny")
    run.add(HeadScores(scores=np.zeros((2000, 2000)), name="huge", probe="planted"))
    fig, msg = headmap.head_figure("tiny", "huge", _app(runs_dir).attnlab_state)
    assert "2000 x 2000 grid" in msg and "more than the head map draws" in msg
    assert len(fig.to_json()) < 10_000


def test_token_strips_are_capped_and_say_so():
    t = TokenScores(
        tokens=[f"t{i}" for i in range(3000)],
        values=np.ones((300, 3000)),
        name="big",
        probe="p",
        row_labels=[f"r{i}" for i in range(300)],
    )
    fig = figures.token_strip(t)
    assert np.asarray(fig.data[0].z).shape == (64, 400)
    assert "tokens 0–399 of 3000" in fig.layout.title.text and "first 64 of 300 rows" in fig.layout.title.text


# ---- token labels are text, never markup -----------------------------------------------------------------------------

MARKUP = ["<s>", "<b>bold</b>", "a&b", "<i", "x>y", "&lt;"]


def test_token_labels_are_escaped_in_every_figure():
    t = TokenScores(tokens=MARKUP, values=np.arange(6.0), name="<b>n</b>", probe="p", marks={"<s>": [0]}, model="<i>m")
    w = np.tril(np.ones((6, 6), np.float32))
    w /= w.sum(1, keepdims=True)
    figs = [
        figures.token_strip(t),
        figures.attention_pattern(w, MARKUP, layer=0, head=0, model="<b>m"),
        figures.query_row_strip(w, MARKUP, query=5, layer=0, head=0),
        figures.attention_difference(w, w, MARKUP, layer=0, head=0),
    ]
    for fig in figs:
        text = json.dumps([list(d.x or []) + list(d.y or []) + [d.name or ""] for d in fig.data]) + str(
            fig.layout.title.text
        )
        for raw in ("<s>", "<b>", "<i"):
            assert raw not in text, (raw, text[:200])
        assert "&lt;s&gt;" in text or "&lt;b&gt;" in text
    assert list(figs[0].data[0].x[:3]) == ["0:&lt;s&gt;", "1:&lt;b&gt;bold&lt;/b&gt;", "2:a&amp;b"]


def test_browser_shows_markup_tokens_as_text(tmp_path):
    """Plotly in Chromium draws the escaped labels as the literal token text ("<s>" visible, nothing bold)."""
    from test_app import headless_chromium

    t = TokenScores(tokens=["<s>", "<b>bold</b>", "plain"], values=np.arange(3.0), name="n", probe="p")
    page = tmp_path / "fig.html"
    figures.token_strip(t).write_html(str(page), include_plotlyjs=True)
    with headless_chromium() as d:
        d.get(page.as_uri())
        import time

        end = time.monotonic() + 30
        ticks = []
        while time.monotonic() < end and len(ticks) < 3:
            ticks = [e.text for e in d.find_elements("css selector", ".xtick text")]
            time.sleep(0.2)
        assert ticks[:3] == ["0:<s>", "1:<b>bold</b>", "2:plain"]
        assert not d.find_elements("css selector", ".xtick text tspan[style*='bold']")


# ---- fitted interventions and incomplete runs ------------------------------------------------------------------------


def test_incomplete_runs_say_so(runs_dir):
    Run.create(runs_dir / "tiny", pending=["previous_token"])
    state = _app(runs_dir).attnlab_state
    assert state.catalog.summary("tiny")["status"] == "incomplete (previous_token)"
    info, *_ = runs.run_selected("tiny", state)
    assert "incomplete run (probes not finished: previous_token)" in info


def test_intervention_load_refuses_classes_outside_the_registry(tmp_path, loaded):
    """Intervention.load imports nothing a JSON names: only the registry's classes are restored."""
    import sys

    from attnlab.interventions.base import JSON_NAME, Intervention
    from attnlab.interventions.zerotuning import ZeroTuning

    model = loaded("llama-gqa")
    good = ZeroTuning(gamma=2.0, heads=[(0, 1)]).fit(model).save(tmp_path / "ok")
    assert isinstance(Intervention.load(good), ZeroTuning)
    meta = json.loads((good / JSON_NAME).read_text())
    for name in (
        "os.system",
        "subprocess.Popen",
        "attnlab_evil_module.Evil",
        "attnlab.interventions.base.Intervention",
        3,
        None,
    ):
        (good / JSON_NAME).write_text(json.dumps({**meta, "class": name}))
        with pytest.raises(AttnlabError, match="not a registered intervention"):
            Intervention.load(good)
    assert "attnlab_evil_module" not in sys.modules
