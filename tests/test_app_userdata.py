"""The app on a researcher's own runs, in headless Chromium (issue #17): a scan of a local checkpoint given by a
relative path on a prompts file, the vision run ``make run`` makes, organism-lm on NIAH prompts, a run whose model
is gone, a 1,000-token token score, and a fitted ACT that kept no heads. Each test loads the page afresh.

Skipped where Debian's chromium / chromium-driver or selenium are missing (``make browser`` installs them)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

import numpy as np
import pytest
from conftest import SHORT_SENTENCES
from test_app import _find, _shot, _text, _wait, headless_chromium

import attnlab
from attnlab.apps import ids
from attnlab.apps.app import create_app
from attnlab.apps.live import LiveModels
from attnlab.cli import main
from attnlab.models.bundled import bundled_path

pytestmark = pytest.mark.skipif(
    bundled_path("organism-lm") is None or bundled_path("organism-vlm") is None, reason="organisms not bundled"
)


@pytest.fixture(scope="module")
def own_runs(tmp_path_factory, checkpoint_dir):
    """The runs directory a user would have after these commands (the tiny GPT-2 given by a relative path from its
    parent directory, on a prompts file), plus a synthetic 1,000-token token score and a run whose model is gone."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("own-runs")
    prompts = tmp_path_factory.mktemp("prompts") / "my_prompts.txt"
    prompts.write_text("\n".join(SHORT_SENTENCES[:4]) + "\n")
    cwd = os.getcwd()
    os.chdir(checkpoint_dir.parent)
    try:  # attnlab scan --model checkpoints0/gpt2 --prompts my_prompts.txt (a relative path, as a user types it)
        rel = f"{checkpoint_dir.name}/gpt2"
        assert (
            main(
                ["scan", "--model", rel, "--probes", "sinks", "--prompts", str(prompts)]
                + ["--out", str(root / "tiny-gpt2"), "--quiet"]
            )
            == 0
        )
    finally:
        os.chdir(cwd)
    for args in (
        ["--model", "organism-lm", "--probes", "first_token_sink", "--dataset", "niah", "--n-prompts", "2"],
        ["--model", "organism-vlm", "--probes", "first_token_sink", "--dataset", "shapes", "--n-prompts", "2"],
    ):
        name = "organism-lm-niah" if "organism-lm" in args else "organism-vlm-shapes"
        assert main(["scan", *args, "--out", str(root / name), "--quiet"]) == 0
    # a run whose checkpoint was deleted: its pattern view fails with a message
    shutil.copytree(root / "tiny-gpt2", root / "a-moved-checkpoint")
    index = json.loads((root / "a-moved-checkpoint" / "run.json").read_text())
    index["info"]["model"].update(name="/nonexistent/checkpoint", path="/nonexistent/checkpoint")
    (root / "a-moved-checkpoint" / "run.json").write_text(json.dumps(index))
    # a long prompt's token scores: marks far past the first page
    from attnlab.heads.results import TokenScores
    from attnlab.heads.runs import Run

    shutil.copytree(root / "tiny-gpt2", root / "long-tokens")
    rng = np.random.default_rng(0)
    run = Run.open(root / "long-tokens")
    run.add(
        TokenScores(
            tokens=[f"t{i}" for i in range(1000)],
            values=rng.random((1, 1000)),
            name="hidden_sinks_long",
            probe="planted",
            marks={"hidden_sink": [120, 455, 701, 990]},
        )
    )
    # attnlab intervene --method act with head filtering that keeps no head (beta = 1 calibrates nothing)
    assert (
        main(
            ["intervene", "--model", "organism-lm", "--method", "act", "--param", "beta=1"]
            + ["--param", "heads=[[3,0],[3,1]]", "--fit", "classify:sentiment:valid", "--eval"]
            + ["classify:sentiment:test", "--n", "4", "--n-boot", "20", "--out", str(root / "act-none")]
        )
        == 0
    )
    return root


@pytest.fixture(scope="module")
def served(own_runs, tmp_path_factory):
    """The app over ``own_runs``, started from another working directory (a relative model path must not matter)."""
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    live = LiveModels(wait_s=60)
    live.preload("organism-lm", attnlab.load("organism-lm"))
    live.preload("organism-vlm", attnlab.load("organism-vlm"))
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    server = make_server("127.0.0.1", 0, create_app(own_runs, live_model=live).server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        thread.join(5)
        os.chdir(cwd)


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as driver:
        yield driver


def _choose(d, dropdown_id: str, text: str, timeout: float = 15.0) -> None:
    """Pick the option whose label starts with ``text`` in a dcc.Dropdown (opening its menu, again if a re-render
    closed it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        button = _find(d, dropdown_id)
        if button.get_attribute("aria-expanded") != "true":
            button.click()
        try:
            options = _wait(
                d,
                lambda d: [o for o in d.find_elements("css selector", "[role=option]") if o.text.startswith(text)],
                2,
                "options",
            )
            options[0].click()
            return
        except Exception:
            continue
    raise AssertionError(f"timed out choosing {text} in {dropdown_id}")


def _open(d, url: str, run: str) -> None:
    d.get(url)
    _wait(d, lambda d: d.find_elements("id", ids.RUN_SELECT), 30, "page")
    _choose(d, ids.RUN_SELECT, run)
    _wait(d, lambda d: run in _text(d, f"#{ids.RUN_SELECT}"), 10, f"run {run} selected")


def _pattern_title(d) -> str:
    return _text(d, f"#{ids.PATTERN} .gtitle")


def _plot_height(d, graph_id: str) -> float:
    return d.execute_script(f"return document.querySelector('#{graph_id} .nsewdrag').getBoundingClientRect().height")


def _click_head(d, layer: int, head: int, n_layers: int, n_heads: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    drag = _find(d, f"#{ids.HEAD_MAP} .nsewdrag", "css selector")
    w, h = drag.size["width"], drag.size["height"]
    dx = (head + 0.5) / n_heads * w - w / 2
    dy = (layer + 0.5) / n_layers * h - h / 2
    ActionChains(d).move_to_element_with_offset(drag, int(dx), int(dy)).click().perform()


# ---- 1. an error never squashes the patterns drawn after it ---------------------------------------------------------


def test_browser_an_error_then_a_pattern_keeps_the_full_height(browser, served):
    d = browser
    _open(d, served, "organism-lm-niah")
    _wait(d, lambda d: _pattern_title(d).startswith("L"), 60, "a pattern")
    time.sleep(0.5)
    full = _plot_height(d, ids.PATTERN)
    assert full > 400  # the 650 px box less its margins
    _choose(d, ids.RUN_SELECT, "a-moved-checkpoint")
    _wait(d, lambda d: _text(d, f"#{ids.PATTERN_STATUS}"), 30, "an error message")  # its checkpoint is gone
    for _ in range(2):  # and back: every pattern after the error is drawn at the full height (~130 px when squashed)
        _choose(d, ids.RUN_SELECT, "organism-lm-niah")
        _wait(d, lambda d: _pattern_title(d).startswith("L") and not _text(d, f"#{ids.PATTERN_STATUS}"), 60, "pattern")
        time.sleep(0.5)
        assert _plot_height(d, ids.PATTERN) == pytest.approx(full, abs=2)
        _choose(d, ids.RUN_SELECT, "a-moved-checkpoint")
        _wait(d, lambda d: _text(d, f"#{ids.PATTERN_STATUS}"), 30, "an error message")


# ---- 2. 3. 4. a run made on a prompts file, with a model given by a relative path, and the vision run ---------------


def test_browser_a_prompts_file_run_shows_its_prompts_and_scores_ablations(browser, served):
    d = browser
    _open(d, served, "tiny-gpt2")
    _wait(d, lambda d: _pattern_title(d).startswith("L"), 60, "the pattern of run prompt 0")
    assert _text(d, f"#{ids.PATTERN_STATUS}") == ""
    assert "The cat sat on the mat." in _text(d, f"#{ids.PROMPT_SELECT}")  # the prompt's own text, kept in the run
    _choose(d, ids.PROMPT_SELECT, "run prompt 3")
    _wait(d, lambda d: "tokens" in _pattern_title(d) and _text(d, f"#{ids.PATTERN_STATUS}") == "", 30, "prompt 3")
    # the ablation view scores the run's own prompts (each one's last token)
    _wait(d, lambda d: "answer log-prob" in _text(d, f"#{ids.ABL_METRIC}"), 10, "the log-prob metric offered")
    assert _text(d, f"#{ids.ABL_STATUS}") == ""
    _find(d, ids.ABL_RUN).click()
    _wait(d, lambda d: _text(d, f"#{ids.ABL_FIGURE} .gtitle").startswith("drop of"), 60, "the ablation result")
    assert _text(d, f"#{ids.ABL_STATUS}") == "" and "baseline" in _text(d, f"#{ids.ABL_TABLE}")


def test_browser_the_vision_run_shows_its_own_prompts(browser, served):
    d = browser
    _open(d, served, "organism-vlm-shapes")
    # the page first shows the catalog's first run (a-moved-checkpoint, whose error may still be on screen): wait
    # for the VLM run's own pattern with no message, and name the message if it never comes
    try:
        _wait(
            d,
            lambda d: _pattern_title(d).startswith("L") and _text(d, f"#{ids.PATTERN_STATUS}") == "",
            60,
            "the pattern",
        )
    except AssertionError:
        raise AssertionError(f"no pattern; status: {_text(d, f'#{ids.PATTERN_STATUS}')!r}") from None
    n_tokens = int(_pattern_title(d).split("(")[1].split(" tokens")[0])
    assert n_tokens > 64  # the 64 image tokens are in the pattern: the prompt ran with its image
    _wait(d, lambda d: _text(d, f"#{ids.VISION_FIGURE} .gtitle"), 60, "the vision overlay")
    _shot(d, ids.PATTERN_VIEW, "pattern_vlm")


# ---- 6. the selected head follows the run; a head that ignores the image says so ------------------------------------


def test_browser_a_run_switch_selects_a_head_of_the_new_run(browser, served, own_runs):
    """A head picked on organism-lm (8 x 12) also exists in the tiny GPT-2 (2 x 4) but means nothing there: the
    switch selects the new run's strongest head instead of carrying the old one over."""
    d = browser
    scores = attnlab.Run.open(own_runs / "tiny-gpt2")["first_token_sink"]
    (layer, head), *_ = scores.top_heads(1)
    picked = next((l, h) for l in range(2) for h in range(4) if (l, h) != (layer, head))
    _open(d, served, "organism-lm-niah")
    _wait(d, lambda d: _pattern_title(d).startswith("L"), 60, "first pattern")
    _click_head(d, *picked, 8, 12)
    _wait(d, lambda d: _text(d, f"#{ids.HEAD_LABEL}") == f"selected head: L{picked[0]}H{picked[1]}", 10, "picked")
    _choose(d, ids.RUN_SELECT, "tiny-gpt2")
    _wait(d, lambda d: "tiny-gpt2" in _text(d, f"#{ids.RUN_SELECT}"), 10, "the switch")
    time.sleep(1.0)
    assert _text(d, f"#{ids.HEAD_LABEL}") == f"selected head: L{layer}H{head}"
    _wait(d, lambda d: _pattern_title(d).startswith(f"L{layer}H{head} attention"), 30, "its pattern")
    assert _text(d, f"#{ids.PATTERN_STATUS}") == ""


def test_browser_a_head_with_no_attention_on_the_image_says_so(browser, served):
    """organism-vlm's L0H7 puts ~1e-21 of its last-token attention on the image: the view says so instead of
    stretching a colour scale over rounding noise."""
    d = browser
    _open(d, served, "organism-vlm-shapes")
    _wait(d, lambda d: _text(d, f"#{ids.VISION_FIGURE} .gtitle"), 60, "the vision overlay")
    _click_head(d, 0, 7, 6, 8)
    _wait(d, lambda d: _text(d, f"#{ids.HEAD_LABEL}") == "selected head: L0H7", 10, "L0H7 selected")
    _wait(d, lambda d: "no attention on the image" in _text(d, f"#{ids.VISION_FIGURE} .gtitle"), 60, "the message")
    assert not d.find_elements("css selector", f"#{ids.VISION_FIGURE} .colorbar")  # no heat drawn
    _click_head(d, 2, 1, 6, 8)  # a head that looks at the image is drawn with its heat map
    _wait(d, lambda d: "over the image patches" in _text(d, f"#{ids.VISION_FIGURE} .gtitle"), 60, "an overlay")


# ---- 7. the tokens view pages through a long prompt and says where it is cut -----------------------------------------


def test_browser_the_tokens_view_pages_through_a_long_prompt(browser, served):
    d = browser
    _open(d, served, "long-tokens")
    _choose(d, ids.TOKEN_RESULT, "hidden_sinks_long")
    _wait(d, lambda d: "tokens 0–399 of 1000" in _text(d, f"#{ids.TOKEN_STRIP} .gtitle"), 20, "the first page")
    status = _text(d, f"#{ids.TOKEN_STATUS}")
    assert "tokens 400–999 after" in status and "3 marked tokens among them" in status
    from selenium.webdriver.common.keys import Keys

    box = _find(d, ids.TOKEN_START)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys("600", Keys.ENTER)
    _wait(d, lambda d: "tokens 600–999 of 1000" in _text(d, f"#{ids.TOKEN_STRIP} .gtitle"), 20, "the last page")
    marked = d.execute_script(
        f"return document.querySelector('#{ids.TOKEN_STRIP} .js-plotly-plot').data.slice(1).flatMap(t => t.x)"
    )
    assert marked == ["701:t701", "990:t990"]  # the marks on this page, drawn where they are


# ---- 9. an intervention that edits no heads says so in the app ------------------------------------------------------


def test_browser_an_intervention_that_edits_no_heads_says_so(browser, served):
    d = browser
    _open(d, served, "organism-lm-niah")
    _choose(d, ids.IV_METHOD, "act (fitted: act-none)")
    _find(d, ids.IV_PROMPT).send_keys("Review: a wonderful film. Sentiment:")
    _find(d, ids.IV_RUN).click()
    _wait(d, lambda d: "edits no heads" in _text(d, f"#{ids.IV_OUTPUTS}"), 120, "the note")
    assert "the intervened model is the baseline" in _text(d, f"#{ids.IV_OUTPUTS}")


# ---- the explore views: a layer's heads, two prompts, head DLA ------------------------------------------------------


def test_browser_explore_views_draw_the_notebook_figures(browser, served):
    d = browser
    _open(d, served, "organism-lm-niah")
    _find(d, ids.GRID_VIEW)  # the Explore tab: its grid is drawn while the tab is open
    _wait(d, lambda d: _text(d, f"#{ids.GRID_FIGURE} .gtitle").startswith("attention of 12 heads"), 60, "the grid")
    _shot(d, ids.GRID_VIEW, "grid")
    _choose(d, ids.PROMPT_SELECT, "typed prompt")
    _find(d, ids.CUSTOM_PROMPT).send_keys("The cat sat on the mat. The dog sat on the")
    _find(d, ids.RUN_PROMPT).click()
    _wait(d, lambda d: "tokens" in _pattern_title(d) and _text(d, f"#{ids.PATTERN_STATUS}") == "", 30, "typed")
    _find(d, ids.CMP_PROMPT).send_keys("The cat sat on the rug. The dog sat on the")
    _find(d, ids.CMP_RUN).click()
    _wait(d, lambda d: _text(d, f"#{ids.CMP_FIGURE} .gtitle").startswith("B vs A"), 60, "the comparison")
    assert _text(d, f"#{ids.CMP_STATUS}") == ""
    _shot(d, ids.CMP_VIEW, "compare")
    _find(d, ids.DLA_ANSWER).send_keys("mat")
    _find(d, ids.DLA_RUN).click()
    _wait(d, lambda d: _text(d, f"#{ids.DLA_FIGURE} .gtitle").startswith("head DLA"), 60, "the attribution")
    assert _text(d, f"#{ids.DLA_STATUS}") == ""
    _shot(d, ids.DLA_VIEW, "dla")
