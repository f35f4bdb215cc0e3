"""The Dash app: callbacks as plain functions (fast), live patterns against the capture engine, and a real
headless-Chromium session (skipped when Debian's chromium / chromium-driver or selenium are missing)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHORT_SENTENCES

import attnlab
from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.app import create_app
from attnlab.apps.callbacks import headmap, pattern, runs, tokens
from attnlab.apps.live import LiveModels
from attnlab.capture import Capture
from attnlab.errors import AttnlabError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, loaded, checkpoint_dir):
    """A runs directory with one scan of the tiny Llama (GQA) on two generated prose prompts, plus decoys."""
    from attnlab.datasets import DATASETS

    root = tmp_path_factory.mktemp("runs")
    model = loaded("llama-gqa")
    attnlab.scan(model, "first_token_sink,act_sinks", DATASETS["prose"](model, 2, 0), out=root / "tiny", progress=False)
    (root / "not-a-run").mkdir()
    outside = tmp_path_factory.mktemp("outside")
    attnlab.scan(model, "first_token_sink", SHORT_SENTENCES[:1], out=outside / "secret", progress=False)
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def app_state(tiny_runs, loaded):
    live = LiveModels(wait_s=0.2)
    model = loaded("llama-gqa")
    live.preload(model.name, model)
    return create_app(tiny_runs, live_model=live).attnlab_state


# ---- runs: only names of runs inside runs_dir ------------------------------------------------------------------


def test_catalog_lists_only_runs_inside_the_directory(app_state):
    assert app_state.catalog.names() == ["tiny"]  # not the plain directory, not the symlink that leaves runs_dir


@pytest.mark.parametrize(
    "name", ["../outside", "/etc", "tiny/../tiny", "escape", "not-a-run", "tiny/run.json", "", None, 3, "..", "."]
)
def test_run_names_that_are_not_runs_are_refused(app_state, name):
    with pytest.raises(AttnlabError):
        app_state.catalog.open(name)
    info, head_opts, *_ = runs.run_selected(name, app_state)
    assert head_opts == [] and ("no run named" in info or name is None)


def test_result_names_are_checked_against_the_run(app_state):
    with pytest.raises(AttnlabError):
        app_state.catalog.result("tiny", "../../etc/passwd", "head_scores")
    fig, msg = headmap.head_figure("tiny", "first_token_sink.json", app_state)
    assert "no head scores result" in msg
    fig, msg = tokens.token_figure("tiny", "first_token_sink", app_state)  # a head result is not a token result
    assert "no token scores result" in msg


def test_run_selection_fills_the_views(app_state):
    info, head_opts, head_value, tok_opts, tok_value, prompt_opts, prompt_value = runs.run_selected("tiny", app_state)
    assert "llama-gqa" in info
    assert head_value == "first_token_sink" and {o["value"] for o in head_opts} >= {
        "first_token_sink",
        "act_first_score",
    }
    assert tok_value is not None and all(o["value"].startswith("act_sink_tokens") for o in tok_opts)
    assert [o["value"] for o in prompt_opts] == ["0", "1", runs.TYPED] and prompt_value == "0"


# ---- head map: a click selects a head --------------------------------------------------------------------------


def test_head_click_selects_that_head(app_state):
    click = {"points": [{"x": "H3", "y": "L1", "z": 0.2}]}
    assert headmap.select_head(ids.HEAD_MAP, click, "tiny", "first_token_sink", {"layer": 0, "head": 0}, app_state) == {
        "layer": 1,
        "head": 3,
    }
    assert headmap.head_label({"layer": 1, "head": 3}) == "selected head: L1H3"


@pytest.mark.parametrize(
    "click",
    [
        None,
        {},
        {"points": []},
        {"points": [{"x": "H99", "y": "L0"}]},
        {"points": [{"x": "L1", "y": "H1"}]},
        {"points": [{"x": "H1"}]},
    ],
)
def test_bad_or_out_of_range_clicks_keep_the_selection(app_state, click):
    current = {"layer": 0, "head": 1}
    assert headmap.select_head(ids.HEAD_MAP, click, "tiny", "first_token_sink", current, app_state) == current


def test_new_score_selects_its_strongest_head(app_state):
    scores = app_state.catalog.result("tiny", "first_token_sink", "head_scores")
    ((layer, head),) = scores.top_heads(1)
    assert headmap.select_head(ids.HEAD_RESULT, None, "tiny", "first_token_sink", None, app_state) == {
        "layer": layer,
        "head": head,
    }


def test_head_map_is_the_notebook_figure(app_state):
    fig, msg = headmap.head_figure("tiny", "first_token_sink", app_state)
    assert msg == ""
    assert fig.to_json() == app_state.catalog.result("tiny", "first_token_sink", "head_scores").plot().to_json()


# ---- attention pattern: live, cached, limited, failures become messages ------------------------------------------


@pytest.mark.parametrize("arch,fused_min_len", [("llama-gqa", 10_000), ("llama-gqa", 1), ("bert", 10_000)])
def test_live_pattern_matches_the_capture_engine(loaded, arch, fused_min_len):
    """The cached-q/k pattern equals the bridge's own hook_pattern for every head (GQA groups, bidirectional),
    whether q/k came from the eager or the fused forward path."""
    model = loaded(arch)
    live = LiveModels(fused_min_len=fused_min_len)
    live.preload(model.name, model)
    prompt = SHORT_SENTENCES[3]
    want = {}
    cap = Capture(model, attention="eager", progress=False)
    cap.on("pattern", lambda layer, p, b: want.__setitem__(layer, p[0].clone()))
    with torch.inference_mode():
        cap.run_batch(model.batch_from_ids([model.token_ids(prompt)], [0]))
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            got = live.pattern(model.name, prompt, layer, head)
            np.testing.assert_allclose(got.weights, want[layer][head].numpy(), atol=2e-5)
    assert len(got.tokens) == got.weights.shape[0]
    assert live.last_path == ("fused" if fused_min_len == 1 and arch == "llama-gqa" else "eager")


def test_pattern_view_shows_the_selected_head(app_state):
    fig, msg = pattern.pattern_figure("tiny", {"layer": 1, "head": 2}, "1", None, 0, None, app_state)
    assert msg == "" and fig.layout.meta["head_label"] == "L1H2" and fig.layout.title.text.startswith("L1H2")
    fig2, _ = pattern.pattern_figure("tiny", {"layer": 0, "head": 3}, "1", None, 0, None, app_state)
    assert fig2.layout.meta["head_label"] == "L0H3" and not np.array_equal(fig.data[0].z, fig2.data[0].z)


def test_run_prompts_are_the_scanned_ones(app_state):
    """The pattern view's 'run prompt i' has the tokens the scan saw (as recorded in the run's token results)."""
    run = app_state.catalog.open("tiny")
    for name in run.names("token_scores"):
        recorded = run[name]
        ids = app_state.live.run_prompt_ids(run.info, recorded.prompt_index)
        data = app_state.live.pattern(run.info["model"]["name"], ids, 0, 0)
        assert data.tokens == recorded.tokens


def test_run_whose_prompts_cannot_be_regenerated_gives_a_message(tiny_runs, app_state, tmp_path):
    """A run written before runs kept their inputs: its prompts are regenerated and checked by fingerprint."""
    import json

    root = tmp_path / "runs"
    shutil.copytree(tiny_runs / "tiny", root / "tampered")
    for name in ("inputs.json", "inputs.safetensors"):  # as an older attnlab wrote it
        (root / "tampered" / name).unlink()
    index = json.loads((root / "tampered" / "run.json").read_text())
    index["info"]["dataset"]["fingerprint"] = "0" * 16  # the scan ran on other inputs than the record regenerates
    (root / "tampered" / "run.json").write_text(json.dumps(index))
    state = create_app(root, live_model=app_state.live).attnlab_state
    _, msg = pattern.pattern_figure("tampered", {"layer": 0, "head": 0}, "0", None, 0, None, state)
    assert "fingerprint differs" in msg
    index["info"]["dataset"]["name"] = "my-own-prompts"
    (root / "tampered" / "run.json").write_text(json.dumps(index))
    _, msg = pattern.pattern_figure("tampered", {"layer": 0, "head": 0}, "0", None, 0, None, state)
    assert "cannot be regenerated" in msg


def test_failed_live_run_shows_a_message_not_a_traceback(tiny_runs):
    def broken_loader(name):
        raise RuntimeError("weights are corrupt\n  File 'x.py', line 3")

    state = create_app(tiny_runs, live_model=LiveModels(broken_loader)).attnlab_state
    fig, msg = pattern.pattern_figure("tiny", {"layer": 0, "head": 0}, runs.TYPED, "hello there", 0, None, state)
    assert msg == "internal error: RuntimeError: weights are corrupt"
    assert "Traceback" not in msg and "File" not in msg and len(fig.data) == 0


def test_prompt_limits_and_busy_state(app_state):
    live = app_state.live
    _, msg = pattern.pattern_figure(
        "tiny", {"layer": 0, "head": 0}, runs.TYPED, "x" * (live.max_chars + 1), 0, None, app_state
    )
    assert "limit is" in msg
    _, msg = pattern.pattern_figure("tiny", {"layer": 0, "head": 0}, runs.TYPED, "   ", 0, None, app_state)
    assert "type a prompt" in msg
    _, msg = pattern.pattern_figure("tiny", {"layer": 0, "head": 0}, "7", None, 0, None, app_state)
    assert "no prompt 7" in msg
    with live.lock:  # another live run holds the model: this one is refused after wait_s, with a message
        _, msg = pattern.pattern_figure("tiny", {"layer": 0, "head": 0}, runs.TYPED, "The cat sat.", 0, None, app_state)
    assert msg.startswith("busy")


def test_long_patterns_are_windowed_and_downsampled():
    rng = np.random.default_rng(0)
    n = 1000
    w = np.tril(rng.random((n, n))).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    toks = [f"t{i}" for i in range(n)]
    fig = figures.attention_pattern(w, toks, layer=2, head=5, max_size=128)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (128, 128)
    np.testing.assert_allclose(z.sum(1), 1.0, atol=1e-4)  # block rows keep their attention mass
    assert len(set(fig.data[0].x)) == 128 and fig.data[0].y[0].startswith("0-")
    fig = figures.attention_pattern(w, toks, layer=2, head=5, window=(900, 950), max_size=128)
    z = np.asarray(fig.data[0].z)
    assert z.shape[0] == 50 and fig.data[0].y[0] == "900:t900"
    with pytest.raises(ValueError):
        figures.attention_pattern(w, toks, layer=0, head=0, window=(5, 5))


def test_token_view_is_the_notebook_figure(app_state):
    name = app_state.catalog.open("tiny").names("token_scores")[0]
    fig, msg = tokens.token_figure("tiny", name, app_state)
    assert msg == "" and fig.to_json() == app_state.catalog.result("tiny", name, "token_scores").plot().to_json()


def test_cli_app_binds_localhost_by_default():
    from attnlab.cli import build_parser

    args = build_parser().parse_args(["app", "--runs", "somewhere"])
    assert (args.host, args.port) == ("127.0.0.1", 8050)


# ---- two runs compared: the head map of their difference ----------------------------------------------------------


@pytest.fixture(scope="module")
def compare_state(tiny_runs, app_state, tmp_path_factory):
    """A runs directory with the tiny scan, a copy whose first_token_sink has a planted change at L1H2 and L0H0, and
    a run whose first_token_sink has another grid (another model)."""
    from attnlab.heads.results import HeadScores

    root = tmp_path_factory.mktemp("compare-runs")
    for name in ("base", "shifted", "other-grid"):
        shutil.copytree(tiny_runs / "tiny", root / name)
    shifted = HeadScores.load(root / "shifted", "first_token_sink")
    shifted.scores = shifted.scores.copy()
    shifted.scores[1, 2] += 0.5
    shifted.scores[0, 0] -= 0.25
    shifted.save(root / "shifted")
    other = HeadScores.load(root / "other-grid", "first_token_sink")
    other.scores = np.zeros((other.n_layers + 1, other.n_heads), dtype=other.scores.dtype)
    other.save(root / "other-grid")
    return create_app(root, live_model=app_state.live).attnlab_state


def test_head_map_difference_of_two_runs(compare_state):
    a = compare_state.catalog.result("shifted", "first_token_sink", "head_scores")
    b = compare_state.catalog.result("base", "first_token_sink", "head_scores")
    fig, msg = headmap.head_figure("shifted", "first_token_sink", compare_state, "base")
    assert msg == ""
    z = np.asarray(fig.data[0].z, dtype=float)
    want = np.zeros_like(z)
    want[1, 2], want[0, 0] = 0.5, -0.25
    np.testing.assert_allclose(z, want, atol=1e-6)  # the planted change, and nothing else
    assert fig.layout.meta["kind"] == "difference" and fig.layout.meta["labels"] == ["shifted", "base"]
    assert fig.layout.meta["max_abs_difference"] == pytest.approx(0.5, abs=1e-6)
    assert fig.data[0].zmid == 0 and "shifted" in fig.layout.title.text and "base" in fig.layout.title.text
    # the app's figure is the notebook's
    assert fig.to_json() == figures.head_map_difference(a, b, labels=("shifted", "base")).to_json()
    # the reverse comparison flips the sign; a click on the difference map selects a head as on a plain map
    rev, _ = headmap.head_figure("base", "first_token_sink", compare_state, "shifted")
    np.testing.assert_allclose(np.asarray(rev.data[0].z, dtype=float), -want, atol=1e-6)
    assert headmap.select_head(
        ids.HEAD_MAP,
        {"points": [{"x": fig.data[0].x[2], "y": fig.data[0].y[1]}]},
        "shifted",
        "first_token_sink",
        None,
        compare_state,
    ) == {"layer": 1, "head": 2}


def test_compare_with_nothing_or_itself_is_the_plain_map(compare_state):
    plain = compare_state.catalog.result("base", "first_token_sink", "head_scores").plot().to_json()
    for compare in (None, "base"):
        fig, msg = headmap.head_figure("base", "first_token_sink", compare_state, compare)
        assert msg == "" and fig.to_json() == plain


@pytest.mark.parametrize(
    "compare,expect",
    [("other-grid", "cannot compare head grids"), ("../base", "no run named"), ("nope", "no run named")],
)
def test_bad_comparisons_give_a_message(compare_state, compare, expect):
    fig, msg = headmap.head_figure("base", "first_token_sink", compare_state, compare)
    assert expect in msg and len(fig.data) == 0


def test_compared_run_must_have_the_same_named_score(compare_state, tmp_path):
    import json

    run = compare_state.catalog.runs_dir / "other-grid"
    index = json.loads((run / "run.json").read_text())
    index["results"].pop("first_token_sink")
    (run / "run.json").write_text(json.dumps(index))
    for suffix in (".json", ".safetensors"):  # the result's files go too (else the index is rebuilt from them)
        (run / f"first_token_sink{suffix}").rename(tmp_path / f"first_token_sink{suffix}")
    try:
        _, msg = headmap.head_figure("base", "first_token_sink", compare_state, "other-grid")
        assert "has no head scores result named 'first_token_sink'" in msg
    finally:
        shutil.copy(compare_state.catalog.runs_dir / "base" / "run.json", run / "run.json")
        for suffix in (".json", ".safetensors"):
            (tmp_path / f"first_token_sink{suffix}").rename(run / f"first_token_sink{suffix}")


# ---- the chosen query row as a token strip ------------------------------------------------------------------------


def test_query_row_strip_is_that_row_of_the_pattern():
    rng = np.random.default_rng(1)
    n = 40
    w = np.tril(rng.random((n, n))).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    toks = [f"t{i}" for i in range(n)]
    fig = figures.query_row_strip(w, toks, query=17, layer=3, head=1, max_tokens=256)
    z = np.asarray(fig.data[0].z, dtype=np.float32)
    assert z.shape == (1, 18)  # a causal row ends at its query
    np.testing.assert_allclose(z[0], w[17, :18])
    assert list(fig.data[0].x[:2]) == ["0:t0", "1:t1"] and fig.data[0].y == ("17:t17",)
    assert fig.layout.meta["query"] == 17 and fig.layout.meta["head_label"] == "L3H1"
    assert figures.query_row_strip(w, toks, query=-1, layer=0, head=0).layout.meta["query"] == n - 1
    full = np.full((n, n), 1.0 / n, dtype=np.float32)  # bidirectional: the row spans the prompt
    assert np.asarray(figures.query_row_strip(full, toks, query=3, layer=0, head=0).data[0].z).shape == (1, n)
    long = figures.query_row_strip(full, toks, query=3, layer=0, head=0, max_tokens=8)
    z = np.asarray(long.data[0].z)
    assert z.shape == (1, 8) and z.sum() == pytest.approx(1.0, abs=1e-5)  # blocks keep the row's mass
    with pytest.raises(ValueError):
        figures.query_row_strip(w, toks, query=n, layer=0, head=0)


def test_pattern_view_toggles_to_the_query_row(app_state):
    selected = {"layer": 1, "head": 2}
    full, msg = pattern.pattern_figure("tiny", selected, "1", None, 0, None, app_state)
    assert msg == ""
    info = app_state.catalog.open("tiny").info
    weights = app_state.live.pattern(info["model"]["name"], app_state.live.run_prompt_ids(info, 1), 1, 2).weights
    n = weights.shape[0]
    last, msg = pattern.pattern_figure("tiny", selected, "1", None, 0, None, app_state, "row", None)
    assert msg == "" and last.layout.meta["query"] == n - 1 and last.layout.meta["head_label"] == "L1H2"
    np.testing.assert_allclose(np.asarray(last.data[0].z, dtype=np.float32)[0], weights[n - 1], atol=1e-6)
    row, msg = pattern.pattern_figure("tiny", selected, "1", None, 0, None, app_state, "row", 5)
    assert msg == "" and row.layout.meta["query"] == 5
    np.testing.assert_allclose(np.asarray(row.data[0].z, dtype=np.float32)[0], weights[5, :6], atol=1e-6)
    assert (
        list(row.data[0].x)
        == [
            f"{i}:{figures.plain(t)}"  # escaped: "<s>" shows as text, not markup
            for i, t in enumerate(
                app_state.live.pattern(info["model"]["name"], app_state.live.run_prompt_ids(info, 1), 1, 2).tokens[:6]
            )
        ]
    )
    for bad in (n, -1):
        fig, msg = pattern.pattern_figure("tiny", selected, "1", None, 0, None, app_state, "row", bad)
        assert "outside the prompt" in msg and len(fig.data) == 0


@pytest.mark.parametrize(
    "click,mode,want",
    [
        ({"points": [{"y": "12:The", "x": "3:a"}]}, "pattern", 12),
        ({"points": [{"y": "40-47:the…"}]}, "pattern", 40),
        ({"points": [{"y": "12:The"}]}, "row", 7),
        (None, "pattern", 7),
        ({"points": [{"y": "L1"}]}, "pattern", 7),
    ],
)
def test_a_click_on_a_pattern_row_picks_that_query_row(click, mode, want):
    assert pattern.row_from_click(click, mode, 7) == want


# ---- 20 concurrent clients against the served app -------------------------------------------------------------------


def test_twenty_concurrent_clients_get_no_errors(compare_state, loaded):
    """20 clients at once on 127.0.0.1: each loads the page, layout and dependencies, then posts the runs, head-map,
    difference-map, pattern and query-row callbacks twice. Every response is HTTP 200 with no error message, no
    exception is raised in the server, and the run ends within its bound. Live callbacks wait their turn (up to 10 s)
    rather than answer "busy", so every pattern is drawn."""
    from attnlab.apps import loadtest

    live = LiveModels(wait_s=10.0)
    model = loaded("llama-gqa")
    live.preload(model.name, model)
    app = create_app(compare_state.catalog.runs_dir, live_model=live)
    with loadtest.ServedApp(app.server) as served:
        assert served.url.startswith("http://127.0.0.1:")
        bodies = loadtest.page_bodies(
            loadtest.dependencies(served.url),
            "shifted",
            "first_token_sink",
            compare="base",
            head={"layer": 1, "head": 2},
        )
        for (
            name,
            body,
        ) in bodies.items():  # each body is a valid callback: it answers alone first (and warms the q/k cache)
            sample = loadtest.timed(name, served.url + loadtest.UPDATE, body, 30)
            assert sample.status == 200 and not sample.error, (name, sample)
        report = loadtest.run_load(served.url, bodies, clients=20, rounds=2, timeout=30)
    print("\n" + "\n".join(report.lines()))
    assert report.requests == 20 * (3 + 2 * len(bodies))
    assert not report.errors, report.lines()
    assert not any(s.busy for s in report.samples), report.lines()
    assert all(s.status == 200 for s in report.samples)
    assert served.exceptions == []
    assert report.wall_s < 60
    summary = report.summary()
    assert summary["by_request"]["head_map_difference"]["n"] == 40


# ---- a real browser ---------------------------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1300,2600",
)


@contextlib.contextmanager
def headless_chromium():
    """A headless Debian Chromium driven by selenium, with its own throw-away profile; skips the test where the
    browser, its driver or selenium are missing."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="attnlab-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def organism_app(tmp_path_factory):
    """The app served on a free localhost port over a small scan of the bundled organism-lm."""
    from werkzeug.serving import make_server

    from attnlab.datasets import DATASETS

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("organism-runs")
    model = attnlab.load("organism-lm")
    attnlab.scan(
        model,
        "first_token_sink,act_sinks,previous_token",
        DATASETS["prose"](model, 2, 0),
        out=root / "organism-lm",
        progress=False,
    )
    live = LiveModels()
    live.preload("organism-lm", model)
    server = make_server("127.0.0.1", 0, create_app(root, live_model=live).server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/", model
    server.shutdown()
    thread.join(5)


def _wait(driver, predicate, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate(driver)
            if value:
                return value
        except Exception:  # element not there yet / stale while dash re-renders
            pass
        time.sleep(0.1)
    if os.environ.get("ATTNLAB_TIMEOUT_SHOTS"):  # debugging: what the page showed when the wait gave up
        driver.save_screenshot(os.path.join(os.environ["ATTNLAB_TIMEOUT_SHOTS"], f"timeout-{int(time.time())}.png"))
    raise AssertionError(f"timed out waiting for {what}")


_SHOW_TAB = """
const el = arguments[0];
const panel = el && el.closest('[role=tabpanel]');
if (!panel || panel.offsetParent !== null) return false;
const value = panel.id.split('-panel-').pop();
const tab = document.getElementById('tab-' + value);
if (tab) { tab.click(); return true; }
return false;
"""


def _show(driver, element) -> None:
    """Open the tab that holds ``element`` (as a user would before reading or using it); no-op when shown."""
    if driver.execute_script(_SHOW_TAB, element):
        time.sleep(0.3)  # the panel appears and plotly resizes into it


def _find(driver, value, by="id"):
    """The element, with its tab opened first."""
    element = driver.find_element(by, value)
    if not element.is_displayed():
        _show(driver, element)
        element = driver.find_element(by, value)
    return element


def _text(driver, css):
    return _find(driver, css, "css selector").text


def screenshot_dir() -> Path:
    """Where browser tests write their screenshots: a throw-away directory, unless ``ATTNLAB_SCREENSHOTS`` names
    one (``ATTNLAB_SCREENSHOTS=figures`` re-takes the README's tracked ``figures/app_*.png``)."""
    chosen = os.environ.get("ATTNLAB_SCREENSHOTS")
    out = (ROOT / chosen) if chosen else Path(tempfile.gettempdir()) / "attnlab-screenshots"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _shot(driver, view_id, name):
    out = screenshot_dir()
    element = _find(driver, view_id)
    driver.execute_script("arguments[0].scrollIntoView(true);", element)
    time.sleep(0.3)  # let plotly finish drawing after the scroll
    element.screenshot(str(out / f"app_{name}.png"))


def test_browser_click_a_head_and_switch_token_score(browser, organism_app):
    from selenium.webdriver.common.action_chains import ActionChains

    url, model = organism_app
    d = browser
    d.get(url)
    _wait(d, lambda d: "organism-lm" in _text(d, f"#{ids.RUN_INFO}"), what="run info")
    # the strongest first_token_sink head is selected and its pattern drawn
    _wait(d, lambda d: _text(d, f"#{ids.PATTERN} .gtitle").startswith("L"), 60, "first pattern")
    assert _text(d, f"#{ids.HEAD_MAP} .gtitle").startswith("first_token_sink")

    # click cell (layer 6, head 3): the selection and the pattern view follow
    target = (6, 3)
    drag = _find(d, f"#{ids.HEAD_MAP} .nsewdrag", "css selector")
    w, h = drag.size["width"], drag.size["height"]
    dx = (target[1] + 0.5) / model.n_heads * w - w / 2
    dy = (target[0] + 0.5) / model.n_layers * h - h / 2
    ActionChains(d).move_to_element_with_offset(drag, int(dx), int(dy)).click().perform()
    _wait(d, lambda d: _text(d, f"#{ids.HEAD_LABEL}") == "selected head: L6H3", 10, "head selection")
    _wait(d, lambda d: _text(d, f"#{ids.PATTERN} .gtitle").startswith("L6H3 attention"), 30, "pattern of L6H3")
    assert _text(d, f"#{ids.PATTERN_STATUS}") == ""
    _shot(d, ids.RUNS_VIEW, "runs")
    _shot(d, ids.HEAD_VIEW, "head_map")
    _shot(d, ids.PATTERN_VIEW, "pattern")

    # toggle to the chosen query row as a token strip (the last token by default), then back
    _find(d, f"#{ids.PATTERN_MODE} input[value=row]", "css selector").click()
    _wait(d, lambda d: _text(d, f"#{ids.PATTERN} .gtitle").startswith("L6H3 attention of query"), 30, "query row strip")
    _shot(d, ids.PATTERN_VIEW, "query_row")
    _find(d, f"#{ids.PATTERN_MODE} input[value=pattern]", "css selector").click()
    _wait(d, lambda d: _text(d, f"#{ids.PATTERN} .gtitle").startswith("L6H3 attention —"), 30, "pattern again")

    # switch the token score
    before = _text(d, f"#{ids.TOKEN_STRIP} .gtitle")
    _find(d, ids.TOKEN_RESULT).click()
    options = _wait(d, lambda d: d.find_elements("css selector", "[role=option]"), 10, "token score options")
    choice = next(
        o
        for o in options
        if o.text and o.text not in before and not o.find_elements("xpath", f"ancestor::*[@id='{ids.PATTERN_MODE}']")
    )
    name = choice.text
    choice.click()
    _wait(d, lambda d: _text(d, f"#{ids.TOKEN_STRIP} .gtitle").startswith(name), 10, f"token strip of {name}")
    _shot(d, ids.TOKENS_VIEW, "tokens")

    # nothing on the page is a traceback
    assert "Traceback" not in d.page_source
