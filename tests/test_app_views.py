"""The app's ablation-scoring, vision and token views: plain callback functions on bundled organisms (a small NIAH scan
of organism-lm made with ``attnlab scan``, a two-image shape-scene scan of organism-vlm, a preplan/anchor scan of
organism-lm on arithmetic), plus the shared figure."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch

import attnlab
from attnlab import figures
from attnlab.apps import ids
from attnlab.apps.app import create_app
from attnlab.apps.callbacks import ablation, vision
from attnlab.apps.live import LiveModels
from attnlab.apps.vision import decode_upload
from attnlab.datasets import shape_prompt_set
from attnlab.models.bundled import bundled_path

pytestmark = pytest.mark.skipif(
    bundled_path("organism-lm") is None or bundled_path("organism-vlm") is None, reason="organisms not bundled"
)


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """Runs dir: ``niah`` (organism-lm, `attnlab scan --dataset niah --n-prompts 2`), ``shapes`` (organism-vlm on two
    shape scenes), ``prose`` (organism-lm on prose) and ``preplan`` (organism-lm, `attnlab scan --probes
    preplan_anchor --dataset arithmetic --n-prompts 4`); one LiveModels with both organisms preloaded."""
    from attnlab.cli import main
    from attnlab.datasets import DATASETS

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("view-runs")
    assert (
        main(
            [
                "scan",
                "--model",
                "organism-lm",
                "--probes",
                "first_token_sink,retrieval_heads",
                "--dataset",
                "niah",
                "--n-prompts",
                "2",
                "--out",
                str(root / "niah"),
                "--quiet",
            ]
        )
        == 0
    )
    lm, vlm = attnlab.load("organism-lm"), attnlab.load("organism-vlm")
    attnlab.scan(lm, "first_token_sink", DATASETS["prose"](lm, 1, 0), out=root / "prose", progress=False)
    attnlab.scan(
        lm, "preplan_anchor", DATASETS["arithmetic"](lm, 4, 0), out=root / "preplan", progress=False
    )  # = the CLI command above
    attnlab.scan(vlm, "first_token_sink", shape_prompt_set("attribute", 2, 0), out=root / "shapes", progress=False)
    live = LiveModels(wait_s=5.0)
    live.preload("organism-lm", lm)
    live.preload("organism-vlm", vlm)
    return create_app(root, live_model=live).attnlab_state, lm, vlm


# ---- the figure ---------------------------------------------------------------------------------------------------


def test_ablation_bars_shows_drops_and_the_random_interval():
    from attnlab.ablation.causal_test import causal_test
    from attnlab.heads.results import HeadScores

    scores = HeadScores(scores=np.arange(12.0).reshape(3, 4), name="s", probe="p")
    value = lambda heads: 10.0 - sum(3.0 if (l, h) in {(2, 3), (2, 2)} else 0.5 + 0.1 * h for l, h in heads)
    table = causal_test(scores, 2, value, n_seeds=4, seed=0)
    table.attrs["metric"] = "m"
    fig = figures.ablation_bars(table)
    meta = fig.layout.meta
    rand = np.asarray(table.attrs["random_values"])
    assert meta["baseline"] == 10.0 and meta["top_drop"] == pytest.approx(6.0)
    assert meta["random_drop"] == pytest.approx(10.0 - rand.mean())
    lo, hi = meta["random_ci"]
    assert lo <= meta["random_drop"] <= hi and lo >= (10.0 - rand).min() - 1e-9 and hi <= (10.0 - rand).max() + 1e-9
    bar = fig.data[0]
    assert list(bar.y) == pytest.approx([6.0, 10.0 - rand.mean()])
    assert bar.error_y.array[1] == pytest.approx(hi - meta["random_drop"]) and bar.error_y.arrayminus[
        1
    ] == pytest.approx(meta["random_drop"] - lo)
    np.testing.assert_allclose(sorted(fig.data[1].y), sorted(10.0 - rand))  # each random set is a dot
    assert meta["p_value"] == pytest.approx(1 / 5)  # the top set drops more than every random set
    with pytest.raises(ValueError):
        figures.ablation_bars(pd.DataFrame([{"condition": "baseline", "metric": 1.0}]))


# ---- ablation scoring view ------------------------------------------------------------------------------------------


def test_metrics_offered_follow_the_run_dataset(views):
    state, *_ = views
    assert ablation.metric_options("niah", state) == (
        [{"label": "answer log-prob (run prompts)", "value": "logprob"}, {"label": "NIAH accuracy", "value": "niah"}],
        "niah",
    )
    assert [o["value"] for o in ablation.metric_options("prose", state)[0]] == ["logprob"]
    assert ablation.metric_options("../niah", state) == ([], None)


def test_ablation_of_top_k_on_niah_accuracy(views):
    state, lm, _ = views
    fig, table, msg = ablation.ablation_result(1, "niah", None, "retrieval_heads", "top", 8, "niah", 2, state)
    assert msg == "", msg
    top = state.catalog.result("niah", "retrieval_heads", "head_scores").top_heads(8)
    meta = fig.layout.meta
    assert meta["k"] == 8 and meta["n_seeds"] == 2 and meta["baseline"] == pytest.approx(1.0)  # organism-lm: NIAH 100%
    rows = table.rowData  # an AG Grid: sortable, filterable
    assert [r["condition"] for r in rows] == ["baseline", "top_k", "random"]
    assert rows[1]["heads"] == " ".join(f"L{l}H{h}" for l, h in top)
    # the NIAH-trained organism's retrieval heads carry the task; 8 random heads barely matter
    assert meta["top_drop"] >= 0.5 and meta["top_drop"] > meta["random_ci"][1]


def test_ablation_of_the_selected_head_on_answer_logprob(views):
    state, lm, _ = views
    fig, table, msg = ablation.ablation_result(
        1, "niah", {"layer": 3, "head": 5}, "first_token_sink", "selected", 7, "logprob", 2, state
    )
    assert msg == "", msg
    assert fig.layout.meta["k"] == 1 and "L3H5" in fig.data[0].x[0]
    # the baseline is the run prompts' answer log-prob, computed here from the regenerated NIAH prompts
    from attnlab.datasets import DATASETS

    ps = DATASETS["niah"](lm, 2, 0)
    want = []
    with torch.no_grad():
        for ids_, m in zip(ps.token_ids, ps.meta):
            logits = lm.forward(lm.batch_from_ids([ids_], [0]))[0].float().log_softmax(-1)
            s = m["prompt_len"]
            want.append(sum(logits[t - 1, ids_[t]].item() for t in range(s, len(ids_))))
    assert fig.layout.meta["baseline"] == pytest.approx(float(np.mean(want)), abs=1e-3)


def test_ablation_on_a_vlm_run_scores_answers_with_their_images(views):
    state, _, vlm = views
    assert [o["value"] for o in ablation.metric_options("shapes", state)[0]] == ["logprob"]
    fig, table, msg = ablation.ablation_result(
        1, "shapes", {"layer": 0, "head": 1}, "first_token_sink", "selected", 1, "logprob", 1, state
    )
    assert msg == "", msg
    # independent baseline: each question with its own image, the answer from the prompt set appended
    ps = shape_prompt_set("attribute", 2, 0)

    def answer_logprob(images):
        want = []
        with torch.no_grad():
            for text, image, m in zip(ps.texts, images, ps.meta):
                enc = vlm.encode([text], images=[image])
                prompt = enc.input_ids[0, enc.real_slice(0)].tolist()
                target = vlm.tokenizer(" " + m["answer"], add_special_tokens=False)["input_ids"]
                ids_ = torch.tensor([prompt + target])
                logp = (
                    vlm.forward(type(enc)(ids_, torch.ones_like(ids_), [0], enc.pixel_values))[0]
                    .float()
                    .log_softmax(-1)
                )
                want.append(sum(logp[len(prompt) + j - 1, t].item() for j, t in enumerate(target)))
        return float(np.mean(want))

    assert fig.layout.meta["baseline"] == pytest.approx(answer_logprob(ps.images), abs=1e-3)
    assert abs(answer_logprob(ps.images[::-1]) - answer_logprob(ps.images)) > 1e-2  # the images matter to this metric


def test_runs_that_cannot_be_scored_say_why_in_one_line(views):
    state, *_ = views
    custom_vlm = {
        "model": {"name": "organism-vlm", "modality": "vision-language"},
        "dataset": {"name": "prompts.jsonl"},
    }
    why = ablation.unavailable_reason(custom_vlm)
    assert "cannot be regenerated" in why and "images" in why and "\n" not in why
    assert "shapes dataset" in ablation.unavailable_reason(
        {"model": {"modality": "vision-language"}, "dataset": {"name": "prose(n=1,seed=0)"}}
    )
    assert (
        ablation.metrics_for(custom_vlm) == [] and ablation.unavailable_reason(state.catalog.open("shapes").info) == ""
    )
    # switching the run clears the view; a scorable run shows no message
    fig, table, msg = ablation.ablation_result(3, "shapes", None, None, "top", 2, "logprob", 2, state, ids.RUN_SELECT)
    assert table is None and msg == ""


@pytest.mark.parametrize(
    "args,expect",
    [
        ((1, "niah", None, "first_token_sink", "selected", 1, "logprob", 2), "select a head"),
        ((1, "niah", None, "first_token_sink", "top", 99, "logprob", 2), "k must be between"),
        ((1, "niah", None, "first_token_sink", "top", 2, "logprob", 0), "seeds must be between"),
        ((1, "prose", None, "first_token_sink", "top", 2, "niah", 2), "not available"),
        ((1, "niah", None, "../secret", "top", 2, "logprob", 2), "no head scores result"),
        ((1, "/etc", None, "first_token_sink", "top", 2, "logprob", 2), "no run named"),
    ],
)
def test_ablation_errors_are_one_line_messages(views, args, expect):
    state, *_ = views
    fig, table, msg = ablation.ablation_result(*args, state)
    assert expect in msg and "\n" not in msg and table is None and len(fig.data) == 0


def test_no_ablation_before_the_button(views):
    state, *_ = views
    fig, table, msg = ablation.ablation_result(0, "niah", None, "first_token_sink", "top", 2, "niah", 2, state)
    assert table is None and msg == "" and len(fig.data) == 0


def test_ablation_waits_for_the_live_lock(views):
    state, *_ = views
    old = state.live.wait_s
    state.live.wait_s = 0.05
    try:
        with state.live.lock:
            _, _, msg = ablation.ablation_result(1, "niah", None, "first_token_sink", "top", 1, "logprob", 1, state)
    finally:
        state.live.wait_s = old
    assert msg.startswith("busy")


# ---- vision view ----------------------------------------------------------------------------------------------------


def _image_attention(vlm, text, image, layer, head):
    """Independent check: the head's attention from the last prompt token summed over the image tokens."""
    from attnlab.capture import Capture

    batch = vlm.encode([text], images=[image])
    sl = batch.real_slice(0)
    got = {}
    cap = Capture(vlm, attention="eager", progress=False)
    cap.on("pattern", lambda l, p, b: got.__setitem__(l, p[0, head].float().clone()), layers=[layer])
    cap.run(iter([batch]))
    row = got[layer][sl.stop - 1]
    return float(row[batch.image_mask[0]].sum())


def test_vision_view_overlays_the_run_image(views):
    state, _, vlm = views
    style, options, value = vision.vision_visibility("shapes", state)
    assert style["display"] == "block" and [o["value"] for o in options] == ["0", "1", "upload"] and value == "0"
    fig, msg = vision.vision_figure("shapes", {"layer": 1, "head": 0}, "1", None, None, state)
    assert msg == "", msg
    ps = shape_prompt_set("attribute", 2, 0)
    grid = np.asarray(fig.data[1].z, dtype=float)
    assert grid.shape == (8, 8) and fig.layout.meta["grid_shape"] == [8, 8]  # 64 image tokens
    assert np.asarray(fig.data[0].z).shape[:2] == np.asarray(ps.images[1]).shape[:2]  # the run's image 1
    want = _image_attention(vlm, ps.texts[1], ps.images[1], 1, 0)
    assert grid.sum() == pytest.approx(want, abs=1e-4) and fig.layout.meta["total"] == pytest.approx(want, abs=1e-4)
    assert 0.0 < want <= 1.0 + 1e-6


def test_vision_view_on_an_uploaded_image(views):
    state, _, vlm = views
    from attnlab.datasets.shapes import render_scene, task_questions

    scene, q = task_questions("count", 1, 5)[0]
    buf = io.BytesIO()
    render_scene(scene).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert vision.uploaded(url, "0") == "upload"
    question = f"USER: <image>\n{q.text} ASSISTANT:"
    fig, msg = vision.vision_figure("shapes", {"layer": 2, "head": 3}, "upload", url, question, state)
    assert msg == "", msg
    want = _image_attention(vlm, question, decode_upload(url), 2, 3)
    assert fig.layout.meta["total"] == pytest.approx(want, abs=1e-4)
    bad = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    for contents, expect in (
        (bad, "could not be read as an image"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png;base64," + "A" * 3_000_000, "larger than"),
    ):
        fig, msg = vision.vision_figure("shapes", {"layer": 2, "head": 3}, "upload", contents, question, state)
        assert expect in msg and len(fig.data) == 0
    fig, msg = vision.vision_figure("shapes", {"layer": 2, "head": 3}, "upload", url, "no image placeholder", state)
    assert "<image>" in msg


def test_text_runs_hide_the_vision_view(views):
    state, *_ = views
    for run in ("niah", "prose", "not-a-run"):
        style, options, value = vision.vision_visibility(run, state)
        assert style["display"] == "none" and options == [] and value is None
    fig, msg = vision.vision_figure("prose", {"layer": 0, "head": 0}, "0", None, None, state)
    assert msg == "" and len(fig.data) == 0


def test_vision_view_errors(views):
    state, *_ = views
    assert "select a head" in vision.vision_figure("shapes", None, "0", None, None, state)[1]
    assert "no head L99H0" in vision.vision_figure("shapes", {"layer": 99, "head": 0}, "0", None, None, state)[1]
    assert "no image 5" in vision.vision_figure("shapes", {"layer": 0, "head": 0}, "5", None, None, state)[1]


# ---- a real browser: run an ablation, see the vision overlay --------------------------------------------------------


def test_browser_ablation_and_vision_views(views):
    """Served app in headless Chromium: the text run hides the vision view; an ablation on the NIAH run draws the
    bars and the table; the VLM run shows its image with the head's attention overlaid; on the preplan/anchor run
    the tokens view switches to a WAAD/FAI token score and marks its preplan and anchor tokens."""
    import logging
    import threading

    from test_app import _shot, _text, _wait
    from werkzeug.serving import make_server

    pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    state, *_ = views
    from attnlab.heads.runs import Run

    run = Run.open(state.catalog.runs_dir / "preplan")
    marked = [
        n
        for n in run.names("token_scores")
        if run[n].marks.get("preplan") and run[n].marks.get("anchor") and n != run.names("token_scores")[0]
    ]
    assert marked, "the preplan/anchor scan marked no preplan and anchor tokens in any prompt but the first"
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = make_server(
        "127.0.0.1", 0, create_app(state.catalog.runs_dir, live_model=state.live).server, threaded=True
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        seen = _browser_session(f"http://127.0.0.1:{server.server_port}/", _text, _wait, _shot, marked[0])
    finally:
        server.shutdown()
        thread.join(5)
    assert seen["ablation"].startswith("drop of NIAH accuracy") and "attention over the image patches" in seen["vision"]
    assert seen["tokens"].startswith(marked[0]) and {"preplan", "anchor"} <= set(seen["marks"])


def _pick(d, _wait, dropdown_id, label):
    """Open a dash dropdown and click the option ``label``."""
    from test_app import _find

    _find(d, dropdown_id).click()
    _wait(
        d,
        lambda d: [o for o in d.find_elements("css selector", "[role=option]") if o.text == label],
        10,
        f"option {label}",
    )[0].click()


def _browser_session(url, _text, _wait, _shot, token_result):
    from test_app import _find, headless_chromium

    with headless_chromium() as d:
        d.get(url)
        _wait(d, lambda d: "organism-lm" in _text(d, f"#{ids.RUN_INFO}"), what="run info")  # first run: "niah"
        assert not d.find_element("id", ids.TAB_VISION).is_displayed()  # no Vision tab for a text run
        _wait(d, lambda d: "NIAH accuracy" in _text(d, f"#{ids.ABL_METRIC}"), 10, "NIAH metric offered")
        _find(d, ids.HEAD_RESULT).click()  # take the top-k of the retrieval-head score
        _wait(
            d,
            lambda d: [o for o in d.find_elements("css selector", "[role=option]") if o.text == "retrieval_heads"],
            10,
            "score option",
        )[0].click()
        _wait(d, lambda d: _text(d, f"#{ids.HEAD_MAP} .gtitle").startswith("retrieval_heads"), 10, "retrieval head map")
        k = _find(d, ids.ABL_K)
        k.clear()
        k.send_keys("8")
        _find(d, ids.ABL_RUN).click()
        _wait(
            d, lambda d: _text(d, f"#{ids.ABL_FIGURE} .gtitle").startswith("drop of NIAH accuracy"), 60, "ablation bars"
        )
        assert "top_k" in _text(d, f"#{ids.ABL_TABLE}") and _text(d, f"#{ids.ABL_STATUS}") == ""
        assert "p = 0.250" in _text(
            d, f"#{ids.ABL_FIGURE} .gtitle"
        )  # the top set drops more than each of 3 random sets
        _shot(d, ids.ABLATION_VIEW, "ablation")
        ablation_title = _text(d, f"#{ids.ABL_FIGURE} .gtitle")
        # switch to the VLM run: the vision view appears with the overlay of the selected head
        _pick(d, _wait, ids.RUN_SELECT, "shapes")
        _wait(d, lambda d: d.find_element("id", ids.TAB_VISION).is_displayed(), 10, "vision tab shown")
        # the run switch selects the run's strongest first_token_sink head (L0H2, which puts no attention on the
        # image); click L0H3, a head that does
        _wait(d, lambda d: _text(d, f"#{ids.HEAD_MAP} .gtitle").startswith("first_token_sink"), 30, "VLM head map")
        _wait(d, lambda d: "on the image" in _text(d, f"#{ids.VISION_FIGURE} .gtitle"), 60, "strongest head's overlay")
        from test_app_userdata import _click_head

        _find(d, ids.HEAD_MAP)  # the Heads tab
        _click_head(d, 0, 3, 6, 8)
        _wait(d, lambda d: _text(d, f"#{ids.HEAD_LABEL}") == "selected head: L0H3", 10, "head selection")
        _wait(
            d,
            lambda d: "L0H3 attention over the image patches" in _text(d, f"#{ids.VISION_FIGURE} .gtitle"),
            60,
            "image overlay",
        )
        assert _text(d, f"#{ids.VISION_STATUS}") == ""
        _shot(d, ids.VISION_VIEW, "vision")
        assert _text(d, f"#{ids.ABL_STATUS}") == ""  # the VLM run can be scored: no "why not" line
        vision_title = _text(d, f"#{ids.VISION_FIGURE} .gtitle")
        # the preplan/anchor run: switch the token score to a prompt's WAAD/FAI result, its marks are drawn
        _pick(d, _wait, ids.RUN_SELECT, "preplan")
        _wait(d, lambda d: not d.find_element("id", ids.TAB_VISION).is_displayed(), 10, "vision tab hidden")
        _wait(
            d,
            lambda d: _text(d, f"#{ids.TOKEN_STRIP} .gtitle").startswith("preplan_anchor_tokens_"),
            30,
            "first token score",
        )
        _pick(d, _wait, ids.TOKEN_RESULT, token_result)
        _wait(
            d,
            lambda d: _text(d, f"#{ids.TOKEN_STRIP} .gtitle").startswith(token_result),
            30,
            f"token strip of {token_result}",
        )
        rows = [t.text for t in d.find_elements("css selector", f"#{ids.TOKEN_STRIP} .ytick")]
        assert "WAAD" in rows and "FAI" in rows, rows
        marks = _wait(
            d,
            lambda d: [t.text for t in d.find_elements("css selector", f"#{ids.TOKEN_STRIP} .legendtext")],
            10,
            "mark legend",
        )
        assert _text(d, f"#{ids.TOKEN_STATUS}") == ""
        _shot(d, ids.TOKENS_VIEW, "tokens_preplan")
        assert "Traceback" not in d.page_source
        return {
            "ablation": ablation_title,
            "vision": vision_title,
            "tokens": _text(d, f"#{ids.TOKEN_STRIP} .gtitle"),
            "marks": marks,
        }
