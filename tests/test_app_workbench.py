"""The app as a workbench (issue #19) and its census view (issue #13, item 5): the shell's plain functions (URL
state, key steps, token axis labels, census options, top examples), ``attnlab report``, and one headless-Chromium
session per module over one served app: tabs, keys, a URL that restores its view on reload, a 1,000-token prompt
with readable axis labels, dark mode, the census view (scatter, click -> pattern on top examples, two runs side by
side), the report opened offline, and a 1400 x 900 screenshot of every tab.

Browser tests skip where Debian's chromium / chromium-driver or selenium are missing (``make browser``)."""

from __future__ import annotations

import html
import json
import logging
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_app import _find, _shot, _text, _wait, headless_chromium, screenshot_dir

import attnlab
from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.app import create_app
from attnlab.apps.callbacks import census as census_cb
from attnlab.apps.callbacks import headmap, runs, shell
from attnlab.apps.live import LiveModels
from attnlab.cli import main
from attnlab.errors import AttnlabError
from attnlab.models.bundled import bundled_path

pytestmark = pytest.mark.skipif(
    bundled_path("organism-lm") is None or bundled_path("organism-vlm") is None, reason="organisms not bundled"
)
LONG = 1000  # tokens of the long prompt


def _long_text(model, n_tokens: int) -> str:
    """Prose cut to ``n_tokens`` tokens (special tokens included)."""
    from attnlab.datasets.prose import prose_paragraphs

    text = "\n\n".join(prose_paragraphs()[:60])
    ids_ = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n_special = len(model.token_ids("a")) - len(model.tokenizer("a", add_special_tokens=False)["input_ids"])
    return model.tokenizer.decode(ids_[: n_tokens - n_special])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A runs directory: organism-lm on prose (head and token scores), organism-lm on one 1,000-token prompt, two
    censuses of organism-lm (prose; repeated random tokens), organism-vlm on shapes, and a fitted ZeroTuning with
    its report (``attnlab intervene --out``)."""
    import torch

    from attnlab.census import census
    from attnlab.datasets import DATASETS

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("workbench-runs")
    lm = attnlab.load("organism-lm")
    attnlab.scan(
        lm,
        "first_token_sink,act_sinks,previous_token",
        DATASETS["prose"](lm, 2, 0),
        out=root / "lm-prose",
        progress=False,
    )
    long_text = _long_text(lm, LONG)
    attnlab.scan(lm, "first_token_sink", [long_text], out=root / "lm-long", progress=False)
    census(lm, DATASETS["prose"](lm, 4, 0), statistics="sinks,headvis", out=root / "census-prose", progress=False)
    census(
        lm,
        DATASETS["repeated-random"](lm, 4, 0),
        statistics="sinks,headvis",
        out=root / "census-random",
        progress=False,
    )
    vlm = attnlab.load("organism-vlm")
    attnlab.scan(vlm, "first_token_sink", DATASETS["shapes"](vlm, 2, 0), out=root / "vlm-shapes", progress=False)
    assert main(["intervene", "--model", "organism-lm", "--method", "zerotuning", "--param", "gamma=1.5", "--fit",
                 "classify:sentiment:valid", "--eval", "classify:sentiment:test", "--n", "4", "--n-boot", "20",
                 "--out", str(root / "zt-report")]) == 0  # fmt: skip
    live = LiveModels(wait_s=60)
    live.preload("organism-lm", lm)
    live.preload("organism-vlm", vlm)
    return root, live, lm


@pytest.fixture(scope="module")
def state(bench):
    root, live, _ = bench
    return create_app(root, live_model=live).attnlab_state


# ---- plain functions ------------------------------------------------------------------------------------------------


def test_url_query_round_trip():
    search = shell.view_query("lm-prose", "first_token_sink", {"layer": 3, "head": 7}, "1", "pattern", None)
    assert search == "?run=lm-prose&result=first_token_sink&head=L3H7&prompt=1&tab=pattern"
    assert shell.parse_query("http://127.0.0.1:8050/" + search + "&evil=1&x=" + "a" * 500) == {
        "run": "lm-prose",
        "result": "first_token_sink",
        "head": "L3H7",
        "prompt": "1",
        "tab": "pattern",
        "x": "a" * 200,  # cut: the query never carries more than 200 characters a key
    }
    assert shell.parse_query(None) == {} and shell.parse_query("http://h/") == {}


@pytest.mark.parametrize(
    "current,step,want",
    [
        ({"layer": 0, "head": 0}, "head+1", {"layer": 0, "head": 1}),
        ({"layer": 0, "head": 11}, "head+1", {"layer": 1, "head": 0}),  # on to the next layer
        ({"layer": 1, "head": 0}, "head-1", {"layer": 0, "head": 11}),
        ({"layer": 0, "head": 0}, "head-1", {"layer": 0, "head": 0}),  # the grid's first head stops the move
        ({"layer": 7, "head": 11}, "head+1", {"layer": 7, "head": 11}),
        ({"layer": 2, "head": 5}, "layer+1", {"layer": 3, "head": 5}),
        ({"layer": 7, "head": 5}, "layer+1", {"layer": 7, "head": 5}),
        ({"layer": 0, "head": 5}, "layer-1", {"layer": 0, "head": 5}),
        (None, "layer+1", {"layer": 0, "head": 0}),
        ({"layer": 2, "head": 5}, "nonsense", {"layer": 2, "head": 5}),
    ],
)
def test_key_steps_move_through_the_grid(current, step, want):
    assert headmap.step_head(current, step, 8, 12) == want


def test_a_bookmarked_view_is_applied_once(state):
    want = {"pending": True, "run": "lm-prose", "result": "previous_token", "prompt": "1", "head": "L4H2"}
    _, _, result, _, _, _, prompt = runs.run_selected("lm-prose", state, want)
    assert (result, prompt) == ("previous_token", "1")
    head, spent = headmap.head_event(ids.RUN_SELECT, None, "lm-prose", result, None, state, want=want)
    assert head == {"layer": 4, "head": 2} and spent is None
    # a URL naming a head outside the grid, or a score the run lacks, falls back to the defaults
    bad = {**want, "head": "L99H0", "result": "nope"}
    _, _, result, *_ = runs.run_selected("lm-prose", state, bad)
    assert result == runs.run_selected("lm-prose", state)[2]
    head, _ = headmap.head_event(ids.RUN_SELECT, None, "lm-prose", result, None, state, want=bad)
    scores = state.catalog.result("lm-prose", result, "head_scores")
    assert head == dict(zip(("layer", "head"), scores.top_heads(1)[0]))
    # another run's URL does not apply here
    _, _, result, *_ = runs.run_selected("census-prose", state, want)
    assert result != "previous_token"


def test_ranked_heads_and_census_points_select_heads(state):
    rows = headmap.top_rows("lm-prose", "first_token_sink", state)
    scores = state.catalog.result("lm-prose", "first_token_sink", "head_scores")
    assert [(r["layer"], r["h"]) for r in rows[:3]] == scores.top_heads(3) and rows[0]["rank"] == 1
    head, _ = headmap.head_event(ids.TOP_HEADS, None, "lm-prose", "first_token_sink", None, state, row=[rows[2]])
    assert (head["layer"], head["head"]) == scores.top_heads(3)[2]
    click = {"points": [{"customdata": [5, 9]}]}
    head, _ = headmap.head_event(ids.CENSUS_FIGURE, None, "census-prose", "first_token_sink", None, state, census=click)
    assert head == {"layer": 5, "head": 9}
    outside = {"points": [{"customdata": [50, 9]}]}
    assert headmap.head_event(ids.CENSUS_FIGURE, None, "lm-prose", "first_token_sink", head, state, census=outside)[
        0
    ] == {"layer": 5, "head": 9}


def test_head_map_outlines_the_selected_head(state):
    fig, msg = headmap.head_figure("lm-prose", "first_token_sink", state, None, {"layer": 2, "head": 3})
    (shape,) = fig.layout.shapes
    assert msg == "" and (shape.x0, shape.x1, shape.y0, shape.y1) == (2.5, 3.5, 1.5, 2.5)
    assert fig.layout.meta["selected"] == "L2H3"


def test_long_prompt_axes_label_whole_tokens():
    rng = np.random.default_rng(0)
    n = LONG
    w = np.tril(rng.random((n, n))).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    toks = [f" word{i}" if i % 7 else "\n" for i in range(n)]
    fig = figures.attention_pattern(w, toks, layer=1, head=2, max_size=192, height=650)
    for axis in (fig.layout.xaxis, fig.layout.yaxis):
        assert axis.tickmode == "array" and 4 <= len(axis.tickvals) <= 60
        for val, text in zip(axis.tickvals, axis.ticktext):
            start = int(re.match(r"^(\d+)", val).group(1))  # the first token of the tick's block
            assert text == figures.token_label(start, toks[start])  # one whole token, at its own cell
            assert "-" not in text.split(":")[0] and not text.endswith("…")
    assert figures.token_label(7, "\n") == "7:⏎" and figures.token_label(3, " ") == "3:␣"
    assert fig.layout.title.text.startswith("L1H2 attention") and "share of the query's attention" in (
        fig.layout.title.text
    )
    log = figures.attention_pattern(w, toks, layer=1, head=2, max_size=64, log=True)
    raw = np.asarray(log.data[0].customdata, dtype=float)
    np.testing.assert_allclose(raw.sum(1), 1.0, atol=1e-4)  # the hover keeps the share of row
    np.testing.assert_allclose(np.asarray(log.data[0].z, dtype=float), np.log10(np.clip(raw, 1e-5, None)), atol=1e-5)
    assert log.data[0].zmin == -5 and log.layout.meta["log"] is True


def test_census_view_functions(state):
    style, options, x, y = census_cb.census_options("census-prose", None, None, state)
    assert style == {"display": "block"} and (x, y) == ("first_token_sink", "prev_token_score")
    assert census_cb.census_options("census-prose", "pattern_entropy", "qk_distance", state)[2:] == (
        "pattern_entropy",
        "qk_distance",
    )  # a bookmarked pair is kept
    assert census_cb.census_options("lm-prose", None, None, state) == ({"display": "none"}, [], None, None)
    a, b, msg = census_cb.census_figures("census-prose", "census-random", x, y, {"layer": 1, "head": 2}, state)
    assert msg == "" and "census-prose" in a.layout.title.text and "census-random" in b.layout.title.text
    assert len(a.data[0].x) == 8 * 12 and len(a.data) == 2  # every head, plus the ring round the selected one
    _, other, _ = census_cb.census_figures("census-prose", "lm-prose", x, y, None, state)
    assert "no census run" in other.layout.annotations[0].text
    _, _, msg = census_cb.census_figures("census-prose", None, "retrieval_heads", y, None, state)
    assert "not scored" in msg


def test_top_examples_are_the_prompts_of_highest_headvis_activation(state):
    planted = np.full((4, 4), 0.1)
    planted[3, 2] = 0.7  # the largest weight off the first row and column
    planted[0, 0] = planted[2, 0] = 0.9  # the first position (a sink) does not count, as query or as key
    assert census_cb.max_activation(planted) == pytest.approx(0.7)
    assert np.isnan(census_cb.max_activation(np.ones((1, 1))))
    fig = census_cb.examples_figure("census-random", {"layer": 2, "head": 3}, state)
    captions = [a.text for a in fig.layout.annotations]
    assert fig.layout.meta["head_label"] == "L2H3" and len(captions) == census_cb.N_EXAMPLES
    shown = [float(re.search(r"max ([0-9.]+)", c).group(1)) for c in captions]
    assert shown == sorted(shown, reverse=True)  # highest first
    run = state.catalog.open("census-random")
    model_name = run.info["model"]["name"]
    every = sorted(
        (
            census_cb.max_activation(state.live.pattern(model_name, runs_prompt(state, run, i), 2, 3).weights)
            for i in range(4)
        ),
        reverse=True,
    )
    np.testing.assert_allclose(shown, every[: census_cb.N_EXAMPLES], atol=5e-4)


def runs_prompt(state, run, i):
    from attnlab.apps.run_inputs import run_prompt

    return run_prompt(state.live, run, i)


# ---- attnlab report ------------------------------------------------------------------------------------------------


def test_report_of_a_census_run(bench, tmp_path, capsys):
    root, _, _ = bench
    out = tmp_path / "census.html"
    assert main(["report", str(root / "census-prose"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    run = attnlab.Run.open(root / "census-prose")
    n_heads, n_tokens = len(run.names("head_scores")), len(run.names("token_scores"))
    n_figures = n_heads + 1 + min(n_tokens, 8)  # every head map, the census scatter, the token strips
    assert len(re.findall(r'<div id="figure-\d+"', page)) == n_figures
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing fetched: plotly.js is inline
    for name in run.names("head_scores"):
        assert f"<td>{name}</td>" in page
    assert "organism-lm" in page and "8 x 12" in page


def test_report_of_an_intervention_run(bench, tmp_path):
    root, _, _ = bench
    out = tmp_path / "iv.html"
    assert main(["report", str(root / "zt-report"), "--out", str(out)]) == 0
    page = out.read_text()
    report = json.loads((root / "zt-report" / "report.json").read_text())
    for col in ("diff_lo", "diff_hi", "baseline_lo", "intervened_hi"):
        assert f"<th>{col}</th>" in page
    row = report["metrics"][0]
    assert f"<td>{row['diff_lo']:.4g}</td>" in page and len(re.findall(r'<div id="figure-\d+"', page)) == 1


@pytest.mark.parametrize("args,expect", [(["/nonexistent-run"], "is not a run"), (["RUN", "--out", "/"], "directory")])
def test_report_refuses_bad_input_in_one_line(bench, capsys, args, expect):
    root, _, _ = bench
    args = [str(root / "lm-prose") if a == "RUN" else a for a in args]
    if "--out" not in args:
        args += ["--out", "x.html"]
    assert main(["report", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1 and "Traceback" not in err
    with pytest.raises(AttnlabError):
        from attnlab.apps.report import build_report

        build_report(root)  # the runs directory itself is no run


# ---- one browser over one served app ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(bench):
    from werkzeug.serving import make_server

    root, live, _ = bench
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = make_server("127.0.0.1", 0, create_app(root, live_model=live).server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join(5)


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as driver:
        driver.set_window_size(1400, 900)
        yield driver


def _head(d) -> str:
    return _text(d, f"#{ids.HEAD_LABEL}").removeprefix("selected head: ")


def _title(d, graph_id) -> str:
    return _text(d, f"#{graph_id} .gtitle")


def _active_tab(d) -> str:
    return d.find_element("css selector", "[role=tab][aria-selected=true]").get_attribute("id").removeprefix("tab-")


def _key(d, key) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    d.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(d).send_keys(key).perform()


def test_browser_tabs_keys_and_url(browser, served):
    """The tabs show their views (no Vision tab for a text run); the arrow keys move the selected head and the
    head map, pattern and tokens views follow; the URL holds the view and a reload restores it."""
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(served + "?run=lm-prose")
    _wait(d, lambda d: _head(d).startswith("L"), 60, "a selected head")
    tabs = [t.get_attribute("id") for t in d.find_elements("css selector", "[role=tab]") if t.is_displayed()]
    assert tabs == [f"tab-{t}" for t in ("runs", "heads", "pattern", "explore", "tokens", "interventions", "ablation")]
    assert _active_tab(d) == "heads"
    for tab, view in (("runs", ids.RUNS_VIEW), ("pattern", ids.PATTERN_VIEW), ("tokens", ids.TOKENS_VIEW)):
        d.find_element("id", f"tab-{tab}").click()
        _wait(d, lambda d, view=view: d.find_element("id", view).is_displayed(), 10, f"{tab} view")
        assert not d.find_element("id", ids.HEAD_VIEW).is_displayed()
    # a view with nothing to show says what to do instead of drawing an empty box
    d.find_element("id", "tab-ablation").click()
    hint = _wait(d, lambda d: d.find_element("id", f"{ids.ABL_FIGURE}-hint").text, 10, "hint")
    assert "run ablation" in hint and not d.find_element("id", ids.ABL_FIGURE).is_displayed()
    d.find_element("id", "tab-heads").click()
    start = _head(d)
    layer, head = map(int, re.match(r"L(\d+)H(\d+)", start).groups())
    first = headmap.step_head({"layer": layer, "head": head}, "head+1", 8, 12)
    want = headmap.step_head(first, "layer+1", 8, 12)
    _key(d, Keys.ARROW_RIGHT)
    _wait(d, lambda d: _head(d) == f"L{first['layer']}H{first['head']}", 30, "the right arrow's step")
    _key(d, Keys.ARROW_DOWN)
    label = f"L{want['layer']}H{want['head']}"
    _wait(d, lambda d: _head(d) == label, 30, f"keys to {label}")
    _wait(d, lambda d: d.execute_script(f"return document.getElementById('{ids.HEAD_MAP}')"
                                        ".querySelector('.js-plotly-plot').layout.meta.selected") == label, 10,
          "the head map's outline")  # fmt: skip
    _wait(d, lambda d: _title(d, ids.PATTERN).startswith(f"{label} attention"), 60, "the pattern follows")
    _wait(d, lambda d: _title(d, ids.TOKENS_HEAD).startswith(f"{label} attention of query"), 60, "tokens follow")
    _key(d, "h")  # vim keys too: back one head
    back = headmap.step_head(want, "head-1", 8, 12)
    _wait(d, lambda d: _head(d) == f"L{back['layer']}H{back['head']}", 10, "h steps back")
    # the view is in the URL; a reload of it restores the run, score, head, prompt and tab
    _find(d, ids.HEAD_RESULT).click()
    _wait(d, lambda d: [o for o in d.find_elements("css selector", "[role=option]") if o.text == "previous_token"],
          10, "score option")[0].click()  # fmt: skip
    _wait(d, lambda d: _title(d, ids.HEAD_MAP).startswith("previous_token"), 10, "the new score")
    before = re.match(r"L(\d+)H(\d+)", _head(d)).groups()
    left = headmap.step_head({"layer": int(before[0]), "head": int(before[1])}, "head-1", 8, 12)
    chosen = f"L{left['layer']}H{left['head']}"
    _key(d, Keys.ARROW_LEFT)
    _wait(d, lambda d: _head(d) == chosen, 30, "the left arrow's step")
    d.find_element("id", "tab-pattern").click()
    _wait(d, lambda d: f"head={chosen}" in d.current_url and "tab=pattern" in d.current_url, 10, "URL")
    url = d.current_url
    layer_, head_ = map(int, re.match(r"L(\d+)H(\d+)", chosen).groups())
    want_query = shell.view_query("lm-prose", "previous_token", {"layer": layer_, "head": head_}, "0", "pattern")
    assert url.split("/", 3)[3] == want_query  # the page writes what view_query says
    d.get("about:blank")
    d.get(url)
    _wait(d, lambda d: _head(d) == chosen, 60, "the restored head")
    assert _active_tab(d) == "pattern"
    _wait(d, lambda d: _title(d, ids.PATTERN).startswith(f"{chosen} attention"), 60, "the restored pattern")
    assert _title(d, ids.HEAD_MAP).startswith("previous_token")
    # a row of the runs table opens that run
    d.find_element("id", "tab-runs").click()
    row = _wait(d, lambda d: [c for c in d.find_elements("css selector", f"#{ids.RUNS_TABLE} .ag-cell")
                              if c.text == "census-prose"], 10, "the runs table")[0]  # fmt: skip
    row.click()
    _wait(d, lambda d: "census-prose" in _text(d, f"#{ids.RUN_SELECT}") and "run=census-prose" in d.current_url, 10,
          "the run opened from the table")  # fmt: skip
    assert "Traceback" not in d.page_source


def test_browser_a_long_prompt_has_readable_axis_labels(browser, served, bench):
    """A 1,000-token prompt drawn as blocks: every tick label is one whole token (``i:token``), sits inside that
    token's cell, lies inside the figure, and overlaps no other label."""
    d = browser
    d.get(served + "?run=lm-long&tab=pattern&head=L0H0")
    _wait(d, lambda d: f"({LONG} tokens" in _title(d, ids.PATTERN), 90, "the long pattern")
    time.sleep(0.5)
    labels = d.execute_script(
        """
        const gd = document.getElementById(arguments[0]).querySelector('.js-plotly-plot');
        const fl = gd._fullLayout, svg = gd.querySelector('.main-svg').getBoundingClientRect();
        const out = [];
        for (const ax of ['x', 'y']) {
          const axis = fl[ax + 'axis'];
          const decode = (s) => { const e = document.createElement('textarea'); e.innerHTML = s; return e.value; };
          const shown = axis.ticktext.map(decode);  // labels are HTML-escaped for plotly (figures.plain)
          gd.querySelectorAll('.' + ax + 'tick text').forEach((t, i) => {
            const r = t.getBoundingClientRect();
            const cat = axis.tickvals[shown.indexOf(t.textContent)];
            const idx = axis._categories.indexOf(cat);
            const lo = axis._offset + axis.l2p(idx - 0.5), hi = axis._offset + axis.l2p(idx + 0.5);
            out.push({ax, text: t.textContent, cat, box: [r.left - svg.left, r.top - svg.top, r.right - svg.left,
                      r.bottom - svg.top], cell: [Math.min(lo, hi), Math.max(lo, hi)], svg: [svg.width, svg.height]});
          });
        }
        return out;
        """,
        ids.PATTERN,
    )
    ids_ = attnlab.Run.open(bench[0] / "lm-long").inputs().token_ids[0]
    tokens = bench[1].pattern("organism-lm", list(ids_), 0, 0).tokens  # the token texts the app shows
    assert len(tokens) == LONG
    for ax in ("x", "y"):
        mine = [lab for lab in labels if lab["ax"] == ax]
        assert len(mine) >= 20, f"only {len(mine)} labels on the {ax} axis"
        for lab in mine:
            pos = int(lab["text"].split(":")[0])
            want = html.unescape(figures.token_label(pos, tokens[pos]))
            assert lab["text"] == want, lab  # a whole token, never a block stub
            assert int(re.match(r"^(\d+)", lab["cat"]).group(1)) == pos  # labelled at the block it starts
            left, top, right, bottom = lab["box"]
            centre = (left + right) / 2 if ax == "x" else (top + bottom) / 2
            assert lab["cell"][0] - 1 <= centre <= lab["cell"][1] + 1, lab  # below / beside its own token's cell
            assert left >= 0 and top >= 0 and right <= lab["svg"][0] and bottom <= lab["svg"][1], lab  # not clipped
        boxes = sorted((lab["box"] for lab in mine), key=lambda b: b[0] if ax == "x" else b[1])
        for a, b in zip(boxes, boxes[1:]):  # neighbours do not overlap
            assert (b[0] >= a[2] - 0.5) if ax == "x" else (b[1] >= a[3] - 0.5), (a, b)


def test_browser_dark_mode(browser, served):
    d = browser
    d.get(served + "?run=lm-prose&tab=heads")
    _wait(d, lambda d: _title(d, ids.HEAD_MAP).startswith("first_token_sink"), 60, "the head map")
    light = d.execute_script("return getComputedStyle(document.body).backgroundColor")
    d.find_element("css selector", f"#{ids.THEME_TOGGLE}").click()
    _wait(d, lambda d: d.execute_script("return document.documentElement.dataset.mantineColorScheme") == "dark", 10,
          "the dark scheme")  # fmt: skip

    def luminance(css: str) -> float:
        r, g, b = (int(v) for v in re.findall(r"\d+", css)[:3])
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    _wait(d, lambda d: luminance(d.execute_script("return getComputedStyle(document.body).backgroundColor")) < 60,
          10, "a dark page")  # fmt: skip
    assert luminance(light) > 200
    title_fill = d.execute_script(f"return getComputedStyle(document.querySelector('#{ids.HEAD_MAP} .gtitle')).fill")
    assert luminance(title_fill) > 150  # figure text is light on the dark page
    dropdown = d.execute_script(f"return getComputedStyle(document.getElementById('{ids.RUN_SELECT}')).color")
    assert luminance(dropdown) > 150  # Dash's own controls follow the theme: light text
    grid_bg = lambda d: d.execute_script(
        f"return getComputedStyle(document.querySelector('#{ids.TOP_HEADS} .ag-root-wrapper')).backgroundColor"
    )
    _wait(d, lambda d: luminance(grid_bg(d)) < 80, 10, "a dark table")  # and so do the AG Grid tables
    time.sleep(0.5)
    d.save_screenshot(str(screenshot_dir() / "app_dark.png"))
    d.find_element("css selector", f"#{ids.THEME_TOGGLE}").click()
    _wait(d, lambda d: d.execute_script("return document.documentElement.dataset.mantineColorScheme") == "light", 10,
          "back to light")  # fmt: skip


def test_browser_census_view(browser, served):
    """Two censuses side by side on the same statistics; a click on a head in the scatter selects it and draws its
    pattern on its top examples."""
    from selenium.webdriver.common.action_chains import ActionChains

    d = browser
    d.get(served + "?run=census-prose&compare=census-random&tab=heads&x=first_token_sink&y=prev_token_score")
    _wait(d, lambda d: _title(d, ids.CENSUS_FIGURE).startswith("census-prose"), 60, "the census scatter")
    _wait(d, lambda d: _title(d, ids.CENSUS_OTHER).startswith("census-random"), 60, "the compared census")
    for gid in (ids.CENSUS_FIGURE, ids.CENSUS_OTHER):
        assert d.find_element("css selector", f"#{gid} .xtitle").text == "first_token_sink"
        assert d.find_element("css selector", f"#{gid} .ytitle").text == "prev_token_score"
    points = d.find_elements("css selector", f"#{ids.CENSUS_FIGURE} .scatterlayer .trace:first-child .point")
    assert len(points) == 8 * 12
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", points[0])
    target = max(points, key=lambda p: p.location["x"])  # the head furthest right: the strongest sink
    ActionChains(d).move_to_element(target).click().perform()
    _wait(d, lambda d: "on its top examples" in _title(d, ids.CENSUS_EXAMPLES), 90, "the head's top examples")
    label = _title(d, ids.CENSUS_EXAMPLES).split(" ")[0]
    assert _head(d) == label  # the click selected that head
    panels = d.find_elements("css selector", f"#{ids.CENSUS_EXAMPLES} .heatmaplayer .hm")
    assert len(panels) == census_cb.N_EXAMPLES
    assert "Traceback" not in d.page_source
    _shot(d, ids.CENSUS_VIEW, "census")


def test_browser_report_opens_offline_and_draws_every_figure(browser, bench, tmp_path):
    """The report of a census run in Chromium with the network cut: every figure draws (plotly is inline)."""
    root, _, _ = bench
    out = tmp_path / "report.html"
    assert main(["report", str(root / "census-prose"), "--out", str(out)]) == 0
    n_figures = len(re.findall(r'<div id="figure-\d+"', out.read_text()))
    d = browser
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0},
    )
    try:
        d.get(out.as_uri())
        _wait(d, lambda d: len(d.find_elements("css selector", ".js-plotly-plot .main-svg")) >= n_figures, 30,
              "every figure")  # fmt: skip
        drawn = d.execute_script("return [...document.querySelectorAll('.js-plotly-plot')].filter(g => g.data && "
                                 "g.data.length && g.querySelector('.gtitle')).length")  # fmt: skip
        assert drawn == n_figures > 1
        assert d.execute_script("return typeof Plotly") == "object"
    finally:
        d.execute_cdp_cmd(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
        )


TAB_SHOTS = {
    "runs": "?run=lm-prose&tab=runs",
    "heads": "?run=census-prose&compare=census-random&tab=heads&head=L5H8",
    "pattern": "?run=lm-prose&tab=pattern&head=L5H8&prompt=1",
    "explore": "?run=lm-prose&tab=explore&head=L5H8",
    "tokens": "?run=lm-prose&tab=tokens&head=L5H8",
    "interventions": "?run=lm-prose&tab=interventions&head=L5H8",
    "ablation": "?run=lm-prose&tab=ablation",
    "vision": "?run=vlm-shapes&tab=vision",
}


def test_browser_screenshots_of_every_tab(browser, served):
    """A 1400 x 900 screenshot of each tab (``ATTNLAB_SCREENSHOTS=figures`` writes the README's ``figures/``)."""
    d = browser
    out = screenshot_dir()
    for tab, query in TAB_SHOTS.items():
        d.get(served + query)
        _wait(d, lambda d, tab=tab: _active_tab(d) == tab and _head(d).startswith("L"), 60, f"the {tab} tab")
        if tab == "ablation":
            _find(d, ids.ABL_RUN).click()
            _wait(d, lambda d: _title(d, ids.ABL_FIGURE).startswith("drop of"), 90, "the ablation")
        if tab == "interventions":
            _find(d, ids.IV_PROMPT).send_keys("Review: a wonderful film, I loved it. Sentiment:")
            _find(d, ids.IV_RUN).click()
            _wait(d, lambda d: "baseline" in _title(d, ids.IV_FIGURE), 90, "the intervention")
        graphs = {"heads": ids.CENSUS_FIGURE, "pattern": ids.PATTERN, "explore": ids.GRID_FIGURE,
                  "tokens": ids.TOKEN_STRIP, "vision": ids.VISION_FIGURE}  # fmt: skip
        if tab in graphs:
            _wait(d, lambda d, g=graphs[tab]: _title(d, g), 90, f"the {tab} figure")
        time.sleep(1.0)
        d.save_screenshot(str(out / f"app_tab_{tab}.png"))
        assert Path(out / f"app_tab_{tab}.png").stat().st_size > 10_000
