"""The app's interventions view: ``compare`` on the tiny checkpoints (neutral parameters change nothing; a head-
specific edit shows up only in the heads it touches), the callback functions, the registry read on every page load,
and a headless-Chromium session on organism-lm (pick a method, run it, see both outputs and the difference figure)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import attnlab
from attnlab import figures
from attnlab.apps import ids
from attnlab.apps import interventions as ivapp
from attnlab.apps.app import create_app
from attnlab.apps.callbacks import interventions as ivcb
from attnlab.apps.live import LiveModels
from attnlab.errors import AttnlabError
from attnlab.interventions.registry import INTERVENTIONS

PROMPT = "The cat sat on the mat. The dog sat on the"


@pytest.fixture(scope="module")
def llama(loaded):
    torch.set_num_threads(1)
    return loaded("llama-gqa")


@pytest.fixture(scope="module")
def iv_state(tmp_path_factory, llama):
    """An app state over one scan of the tiny Llama, with that model preloaded."""
    from attnlab.datasets import DATASETS

    root = tmp_path_factory.mktemp("iv-runs")
    attnlab.scan(llama, "first_token_sink", DATASETS["prose"](llama, 1, 0), out=root / "tiny", progress=False)
    live = LiveModels(wait_s=0.2)
    live.preload(llama.name, llama)
    return create_app(root, live_model=live).attnlab_state


# ---- compare: neutral parameters and head-specific edits -----------------------------------------------------------


@pytest.mark.parametrize(
    "method,params",
    [("zerotuning", "gamma=1 heads=[[1,0],[1,1],[0,2]]"), ("act", "beta=1 heads=[[1,0],[1,1]] threshold=0.0")],
)
def test_neutral_parameters_change_nothing(llama, method, params):
    iv = ivapp.prepare(llama, method, params)
    res = ivapp.compare(llama, iv, PROMPT, head=(1, 0), max_new_tokens=3)
    assert res.delta_p == pytest.approx(0.0, abs=1e-6)
    assert np.abs(res.pattern_difference).max() <= 1e-6
    assert res.output_baseline == res.output_intervened and res.top_baseline == res.top_intervened
    assert res.head_touched is True and res.pattern_baseline.shape == (len(res.tokens), len(res.tokens))


def test_a_head_edit_shows_only_in_the_heads_it_touches(llama):
    iv = ivapp.prepare(llama, "zerotuning", "gamma=4 heads=[[1,0]]")
    diff = {h: ivapp.compare(llama, iv, PROMPT, head=h, max_new_tokens=1) for h in [(1, 0), (1, 1), (1, 3), (0, 0)]}
    touched = diff[(1, 0)]
    assert touched.head_touched and np.abs(touched.pattern_difference).max() > 1e-3
    for h in [(1, 1), (1, 3), (0, 0)]:  # other heads of the same layer and earlier layers see the same inputs
        assert diff[h].head_touched is False
        assert np.abs(diff[h].pattern_difference).max() <= 1e-6, h
    # both patterns are softmax rows, so each row of the difference sums to 0; gamma > 1 moves mass onto the first key
    np.testing.assert_allclose(touched.pattern_difference.sum(-1), 0.0, atol=1e-5)
    assert (touched.pattern_difference[1:, 0] >= -1e-7).all() and touched.pattern_difference[1:, 0].max() > 1e-3
    # the answer probability is the baseline's top token (no answer given) and it moves
    assert not touched.answer_given and touched.answer_token == touched.top_baseline


@pytest.mark.skipif("softpag" not in INTERVENTIONS, reason="SoftPAG decoding is not registered")
def test_softpag_guidance_shows_the_perturbed_map(llama):
    """SoftPAG decoding runs a clean and a head-perturbed pass per forward: the view shows the perturbed map of the
    touched head (u = 1: the identity, so the difference is I - A there), nothing in an untouched head; u = 0 is
    neutral in outputs, probability and pattern."""
    neutral = ivapp.compare(
        llama, ivapp.prepare(llama, "softpag", "heads=[[1,0]] u=0 scale=2"), PROMPT, head=(1, 0), max_new_tokens=2
    )
    assert neutral.delta_p == pytest.approx(0.0, abs=1e-6) and np.abs(neutral.pattern_difference).max() <= 1e-6
    iv = ivapp.prepare(llama, "softpag", "heads=[[1,0]] u=1 scale=2")
    touched = ivapp.compare(llama, iv, PROMPT, head=(1, 0), max_new_tokens=1)
    np.testing.assert_allclose(touched.pattern_intervened, np.eye(len(touched.tokens)), atol=1e-6)
    assert abs(touched.delta_p) > 1e-6
    other = ivapp.compare(llama, iv, PROMPT, head=(1, 1), max_new_tokens=1)
    assert np.abs(other.pattern_difference).max() <= 1e-6 and other.delta_p == pytest.approx(touched.delta_p)


def test_expected_answer_probability_is_the_next_token_softmax(llama):
    iv = ivapp.prepare(llama, "zerotuning", "gamma=3")
    res = ivapp.compare(llama, iv, PROMPT, answer="mat", head=None, max_new_tokens=2)
    target = ivapp.answer_token_id(llama, PROMPT, "mat")
    assert target == llama.tokenizer(" mat", add_special_tokens=False)["input_ids"][0]
    batch = llama.encode([PROMPT])
    with torch.no_grad():
        base = llama.forward(batch)[0, -1].float().softmax(-1)[target].item()
        with iv.apply(llama):
            treated = llama.forward(batch)[0, -1].float().softmax(-1)[target].item()
    assert res.p_baseline == pytest.approx(base, abs=1e-6) and res.p_intervened == pytest.approx(treated, abs=1e-6)
    assert res.answer_given and (res.layer, res.head) == (0, 0)  # no head given: the first head it edits
    assert abs(res.delta_p) > 1e-6
    frame = res.to_frame()
    assert list(frame["run"]) == ["baseline", "zerotuning"] and frame["delta_p"].iloc[1] == pytest.approx(res.delta_p)


def test_difference_figure_is_the_result_plot(llama):
    iv = ivapp.prepare(llama, "zerotuning", "gamma=4 heads=[[1,2]]")
    res = ivapp.compare(llama, iv, PROMPT, head=(1, 2), max_new_tokens=1)
    fig = res.plot()
    meta = fig.layout.meta
    assert meta["kind"] == "attention_difference" and meta["head_label"] == "L1H2" and meta["method"] == "zerotuning"
    assert meta["max_abs_difference"] == pytest.approx(float(np.abs(res.pattern_difference).max()))
    np.testing.assert_allclose(np.asarray(fig.data[0].z), res.pattern_difference, atol=1e-7)
    assert fig.data[0].zmid == 0.0
    small = figures.attention_difference(
        res.pattern_baseline, res.pattern_intervened, res.tokens, layer=1, head=2, max_size=4
    )
    assert np.asarray(small.data[0].z).shape == (4, 4) and "blocks" in small.layout.title.text
    with pytest.raises(ValueError):
        figures.attention_difference(np.zeros((3, 3)), np.zeros((4, 4)), ["a"] * 4, layer=0, head=0)


# ---- methods, parameters, availability -----------------------------------------------------------------------------


def test_split_params_keeps_json_lists_whole():
    assert ivapp.split_params("beta=0.4  heads=[[3, 0], [3, 1]];threshold=0.1\nlayers=[2, 3]") == [
        "beta=0.4",
        "heads=[[3, 0], [3, 1]]",
        "threshold=0.1",
        "layers=[2, 3]",
    ]
    assert ivapp.split_params("") == [] and ivapp.split_params(None) == []
    with pytest.raises(AttnlabError):
        ivapp.split_params("x=" + "1" * 5000)


@pytest.mark.parametrize(
    "method,params,expect",
    [
        ("var", "", "var cannot run here: VAR.fit needs image prompts"),
        ("vhr", "", "vhr cannot run here"),
        ("soft-injection", "", "soft-injection cannot run here"),
        ("zerotuning", "", "gamma=None is chosen on fit data"),
        ("zerotuning", "gamma=2 heads=[[9,0]]", "outside"),
        ("act", "bogus=1", "act has no parameter 'bogus'"),
        ("nope", "", "unknown method"),
        ("act", "beta", "must look like name=value"),
    ],
)
def test_methods_that_cannot_run_say_why_in_one_line(llama, method, params, expect):
    with pytest.raises(AttnlabError) as e:
        ivapp.prepare(llama, method, params)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_methods_are_read_from_the_registry_on_each_page_load(iv_state, monkeypatch):
    from attnlab.apps.layout import build_layout

    class Later(INTERVENTIONS["zerotuning"]):
        """A method registered after the app was built."""

    monkeypatch.setitem(INTERVENTIONS, "later", Later)
    assert "later" in ivapp.methods()
    layout = build_layout(iv_state)
    dropdown = next(c for c in _walk(layout) if getattr(c, "id", None) == ids.IV_METHOD)
    assert [o["value"] for o in dropdown.options] == list(INTERVENTIONS)
    params, info = ivcb.method_info("later", "tiny", iv_state)
    assert info.startswith("A method registered after the app was built.") and "cannot run here" in info


def _walk(component):
    yield component
    children = getattr(component, "children", None)
    for child in (
        children
        if isinstance(children, list)
        else [children]
        if children is not None and not isinstance(children, str)
        else []
    ):
        yield from _walk(child)


# ---- callbacks -------------------------------------------------------------------------------------------------------


def test_method_info_says_whether_it_runs(iv_state):
    params, info = ivcb.method_info("zerotuning", "tiny", iv_state)
    assert params == "gamma=2.0" and info.endswith("available on this model")
    params, info = ivcb.method_info("vhr", "tiny", iv_state)
    assert params == "" and "cannot run here: VHR.fit needs image prompts" in info and "\n" not in info


def test_run_button_draws_both_outputs_and_the_difference(iv_state, llama):
    fig, outputs, msg = ivcb.comparison(
        1, "tiny", {"layer": 1, "head": 1}, "zerotuning", "gamma=3 heads=[[1,1]]", PROMPT, "", iv_state
    )
    assert msg == "", msg
    assert fig.layout.meta["head_label"] == "L1H1" and fig.layout.meta["max_abs_difference"] > 1e-3
    table, line = outputs.children
    rows = table.rowData  # an AG Grid: sortable, filterable
    assert [r["run"] for r in rows] == ["baseline", "zerotuning"]
    assert line.children.startswith("baseline's top token") and "a head the intervention edits" in line.children
    runs_dir = str(iv_state.catalog.runs_dir)
    assert runs_dir not in str(outputs) and runs_dir not in fig.layout.title.text  # names, never paths


@pytest.mark.parametrize(
    "args,expect",
    [
        ((1, "tiny", None, "zerotuning", "gamma=2", "", ""), "type a prompt"),
        ((1, "tiny", None, "var", "", PROMPT, ""), "cannot run here"),
        ((1, "tiny", {"layer": 7, "head": 0}, "zerotuning", "gamma=2", PROMPT, ""), "has no head L7H0"),
        ((1, "/etc", None, "zerotuning", "gamma=2", PROMPT, ""), "no run named"),
        ((1, "tiny", None, "nope", "", PROMPT, ""), "unknown method"),
        ((1, "tiny", None, "zerotuning", "gamma=2", "x" * 30000, ""), "the limit is"),
    ],
)
def test_failed_runs_are_one_line_messages(iv_state, args, expect):
    fig, outputs, msg = ivcb.comparison(*args, iv_state)
    assert expect in msg and "\n" not in msg and "Traceback" not in msg and outputs is None and len(fig.data) == 0


def test_no_run_before_the_button_and_busy_while_another_runs(iv_state):
    fig, outputs, msg = ivcb.comparison(0, "tiny", None, "zerotuning", "gamma=2", PROMPT, "", iv_state)
    assert outputs is None and msg == "" and len(fig.data) == 0
    with iv_state.live.lock:
        _, outputs, msg = ivcb.comparison(1, "tiny", None, "zerotuning", "gamma=2", PROMPT, "", iv_state)
    assert msg.startswith("busy") and outputs is None


# ---- a real browser --------------------------------------------------------------------------------------------------


def test_browser_interventions_view(tmp_path_factory):
    """Served app on organism-lm in headless Chromium: pick ZeroTuning, run a prompt, see both outputs and the
    attention difference of the selected head; then pick VHR and read why it is unavailable; then pick the
    ZeroTuning that the runs directory holds fitted on organism-lm (``attnlab intervene --out zt-organism`` leaves
    ``zt-organism/intervention/``), run it, and see it labelled "(fitted: zt-organism)" with no path in the page."""
    from test_app import CHROMEDRIVER, CHROMIUM, _shot, _text, _wait

    from attnlab.models.bundled import bundled_path

    if bundled_path("organism-lm") is None:
        pytest.skip("organism-lm is not bundled")

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from attnlab.apps import loadtest
    from attnlab.datasets import DATASETS

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("iv-organism-runs")
    model = attnlab.load("organism-lm")
    attnlab.scan(model, "first_token_sink", DATASETS["prose"](model, 1, 0), out=root / "organism-lm", progress=False)
    # what `attnlab intervene --out zt-organism` saves: every head's first-key attention scaled by 2 (fixed parameters)
    from attnlab.interventions.zerotuning import ZeroTuning

    ZeroTuning(gamma=2.0).fit(model, None, split="none").save(root / "zt-organism" / "intervention")
    (root / "zt-organism" / "report.json").write_text("{}")  # written last by a finished `attnlab intervene`
    live = LiveModels()
    live.preload("organism-lm", model)
    with loadtest.ServedApp(create_app(root, live_model=live).server) as served:
        seen = _browser_session(served.url, _text, _wait, _shot)
    assert served.exceptions == []
    assert seen["figure"].startswith("L") and "zerotuning − baseline" in seen["figure"]
    assert "baseline" in seen["outputs"] and "zerotuning" in seen["outputs"] and "p " in seen["outputs"]
    assert "cannot run here" in seen["vhr"]
    fitted = seen["fitted"]
    assert fitted["info"].startswith("zerotuning fitted by 'attnlab intervene' (run zt-organism)") and fitted[
        "info"
    ].endswith("available on this model")
    assert fitted["params"] == "" and fitted["status"] == ""
    title = fitted["figure"]
    assert title.startswith("L") and "zerotuning (fitted: zt-organism) − baseline" in title and "organism-lm" in title
    assert float(re.search(r"max \|Δ\| ([0-9.]+)", title).group(1)) > 1e-4, (
        title
    )  # gamma=2 on every head moves the drawn one
    rows = fitted["outputs"].splitlines()
    assert any(r.startswith("baseline") for r in rows) and any(
        r.startswith("zerotuning (fitted: zt-organism)") for r in rows
    ), rows
    assert "a head the intervention edits" in fitted["outputs"] and "p " in fitted["outputs"]
    for page in (fitted["page"], fitted["outputs"], fitted["info"], title):
        assert str(root) not in page and str(tmp_path_factory.getbasetemp()) not in page and "Traceback" not in page


def _browser_session(url, _text, _wait, _shot):
    from selenium.webdriver.common.keys import Keys
    from test_app import _find, headless_chromium

    with headless_chromium() as d:
        d.get(url)
        _wait(d, lambda d: "organism-lm" in _text(d, f"#{ids.RUN_INFO}"), what="run info")
        _wait(d, lambda d: _text(d, f"#{ids.PATTERN} .gtitle").startswith("L"), 60, "a head is selected")
        _find(d, ids.IV_METHOD).click()
        _wait(
            d,
            lambda d: [o for o in d.find_elements("css selector", "[role=option]") if o.text == "zerotuning"],
            10,
            "method option",
        )[0].click()
        _wait(d, lambda d: "available on this model" in _text(d, f"#{ids.IV_INFO}"), 20, "zerotuning available")
        params = _find(d, ids.IV_PARAMS)
        params.send_keys(Keys.CONTROL, "a")
        params.send_keys(Keys.BACKSPACE)
        params.send_keys("gamma=3")
        _find(d, ids.IV_PROMPT).send_keys(
            "The secret KEY code is 482.\nQuestion: What is the secret KEY code?\nAnswer:"
        )
        _find(d, ids.IV_ANSWER).send_keys("482")
        _find(d, ids.IV_RUN).click()
        try:
            _wait(d, lambda d: "baseline" in _text(d, f"#{ids.IV_FIGURE} .gtitle"), 60, "attention difference")
        except AssertionError:
            raise AssertionError(
                f"no attention difference; status {_text(d, f'#{ids.IV_STATUS}')!r}, "
                f"info {_text(d, f'#{ids.IV_INFO}')!r}"
            ) from None
        assert _text(d, f"#{ids.IV_STATUS}") == ""
        outputs = _text(d, f"#{ids.IV_OUTPUTS}")
        _shot(d, ids.IV_VIEW, "interventions")
        figure = _text(d, f"#{ids.IV_FIGURE} .gtitle")
        _find(d, ids.IV_METHOD).click()
        _wait(
            d,
            lambda d: [o for o in d.find_elements("css selector", "[role=option]") if o.text == "vhr"],
            10,
            "vhr option",
        )[0].click()
        _wait(d, lambda d: "cannot run here" in _text(d, f"#{ids.IV_INFO}"), 20, "vhr unavailable")
        assert "Traceback" not in d.page_source
        vhr = _text(d, f"#{ids.IV_INFO}")
        return {"figure": figure, "outputs": outputs, "vhr": vhr, "fitted": _run_fitted(d, "zt-organism", _text, _wait)}


def _run_fitted(d, name, _text, _wait):
    """Pick the dropdown entry "zerotuning (fitted: NAME)" (typed into the search box: it is the last entry), run the
    prompt already typed, and wait for a difference figure labelled with it. -> what the page shows."""
    from test_app import _find

    label = f"zerotuning (fitted: {name})"
    _find(d, ids.IV_METHOD).click()
    search = _wait(d, lambda d: d.find_element("css selector", "input.dash-dropdown-search"), 10, "method search box")
    search.send_keys(name)
    option = _wait(
        d,
        lambda d: [o for o in d.find_elements("css selector", "[role=option]") if o.text == label],
        10,
        "fitted option",
    )[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'nearest'});", option)
    option.click()
    _wait(
        d,
        lambda d: (
            "fitted by 'attnlab intervene'" in _text(d, f"#{ids.IV_INFO}")
            and "available on this model" in _text(d, f"#{ids.IV_INFO}")
        ),
        20,
        "fitted intervention available",
    )
    _find(d, ids.IV_RUN).click()
    try:
        _wait(
            d,
            lambda d: (
                f"(fitted: {name})" in _text(d, f"#{ids.IV_FIGURE} .gtitle")
                and f"(fitted: {name})" in _text(d, f"#{ids.IV_OUTPUTS}")
            ),
            60,
            "fitted attention difference",
        )
    except AssertionError:
        raise AssertionError(
            f"no fitted difference; status {_text(d, f'#{ids.IV_STATUS}')!r}, info {_text(d, f'#{ids.IV_INFO}')!r}"
        ) from None
    return {
        "info": _text(d, f"#{ids.IV_INFO}"),
        "params": _find(d, ids.IV_PARAMS).get_attribute("value"),
        "status": _text(d, f"#{ids.IV_STATUS}"),
        "figure": _text(d, f"#{ids.IV_FIGURE} .gtitle"),
        "outputs": _text(d, f"#{ids.IV_OUTPUTS}"),
        "page": d.page_source,
    }


# ---- concurrent clients on the live views ----------------------------------------------------------------------------


def test_twenty_clients_on_the_interventions_and_ablation_views(iv_state, llama):
    """20 clients at once post the intervention info, "run intervention" and "run ablation" callbacks (live, one
    at a time behind the lock, waiting rather than answering busy): every answer is HTTP 200 with an empty status
    line's worth of content (no error text), nothing raises in the server."""
    from attnlab.apps import loadtest

    live = LiveModels(wait_s=20.0)
    live.preload(llama.name, llama)
    app = create_app(iv_state.catalog.runs_dir, live_model=live)
    with loadtest.ServedApp(app.server) as served:
        bodies = loadtest.view_bodies(
            loadtest.dependencies(served.url),
            "tiny",
            head={"layer": 1, "head": 0},
            intervention={"method": "zerotuning", "params": "gamma=2 heads=[[1,0]]", "prompt": PROMPT},
            ablation={"source": "selected", "k": 1, "metric": "logprob", "seeds": 1},
        )
        assert sorted(bodies) == ["ablation", "intervention", "intervention_info"]
        for name, status in (("intervention", ids.IV_STATUS), ("ablation", ids.ABL_STATUS)):
            out = loadtest.callback_response(served.url, bodies[name])
            assert out[status]["children"] == "", (name, out[status])
        fig = loadtest.callback_response(served.url, bodies["intervention"])[ids.IV_FIGURE]["figure"]
        assert fig["layout"]["meta"]["head_label"] == "L1H0" and fig["layout"]["meta"]["max_abs_difference"] > 1e-3
        report = loadtest.run_load(served.url, bodies, clients=20, rounds=1, timeout=30)
    print("\n" + "\n".join(report.lines()))
    assert report.requests == 20 * (3 + len(bodies))
    assert not report.errors and not any(s.busy for s in report.samples), report.lines()
    assert served.exceptions == []


# ---- fitted interventions of the runs directory (attnlab intervene --out NAME) ---------------------------------------

SI_PROMPT = "Q: cat\nA: CAT\n\nQ: dog\nA:"
SI_PAIRS = [(w, w.upper()) for w in "cat dog sun moon tree lake rock fish bird star leaf rain".split()]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, llama, loaded):
    """A runs directory with a scan of the tiny Llama ("tiny") and what ``intervene --out`` leaves there: soft
    injection fitted on the tiny Llama ("site-llama"), ZeroTuning fitted on the tiny GPT-2 (same 2 x 4 grid,
    "zt-gpt2"), and broken ones: bad JSON, a class outside the registry, garbage arrays; plus a symlink that leaves
    the directory. -> (state, soft-injection object, runs dir, outside dir)."""
    import json
    import shutil

    from attnlab.datasets import DATASETS
    from attnlab.interventions.soft_injection import SoftInjection
    from attnlab.interventions.zerotuning import ZeroTuning

    root = tmp_path_factory.mktemp("iv-fitted-runs")
    attnlab.scan(llama, "first_token_sink", DATASETS["prose"](llama, 1, 0), out=root / "tiny", progress=False)
    si = SoftInjection(n_prompts=4, n_shots=2, n_steps=4, val_every=2, n_val=3, top_k=3).fit(
        llama, {"train": SI_PAIRS[:9], "valid": SI_PAIRS[9:]}, split="toy-caps"
    )
    si.save(root / "site-llama" / "intervention")
    ZeroTuning(gamma=2.0).fit(loaded("gpt2"), None, split="none").save(root / "zt-gpt2" / "intervention")
    (root / "broken" / "intervention").mkdir(parents=True)
    (root / "broken" / "intervention" / "intervention.json").write_text("{not json")
    meta = json.loads((root / "site-llama" / "intervention" / "intervention.json").read_text())
    (root / "alien" / "intervention").mkdir(parents=True)
    (root / "alien" / "intervention" / "intervention.json").write_text(
        json.dumps({**meta, "class": "attnlab_no_such_module.Evil"})
    )
    shutil.copytree(root / "site-llama", root / "bad-arrays")
    (root / "bad-arrays" / "intervention" / "arrays.safetensors").write_bytes(b"\x00garbage" * 10)
    outside = tmp_path_factory.mktemp("iv-outside")
    si.save(outside / "intervention")
    for d in (outside, *(root / n for n in ("site-llama", "zt-gpt2", "broken", "alien", "bad-arrays"))):
        (d / "report.json").write_text("{}")  # what a finished `attnlab intervene` writes last
    (root / "escape").symlink_to(outside, target_is_directory=True)
    live = LiveModels(wait_s=0.2)
    live.preload(llama.name, llama)
    return create_app(root, live_model=live).attnlab_state, si, root, outside


def test_fitted_interventions_are_listed_by_run_name(fitted):
    from attnlab.apps.layout import build_layout

    state, _, root, outside = fitted
    assert state.catalog.fitted_names() == ["alien", "bad-arrays", "broken", "site-llama", "zt-gpt2"]  # not "escape"
    options = ivapp.method_options(state.catalog)
    assert options[: len(INTERVENTIONS)] == [{"label": n, "value": n} for n in INTERVENTIONS]
    extra = {o["value"]: o["label"] for o in options[len(INTERVENTIONS) :]}
    assert (
        extra["fitted:site-llama"] == "soft-injection (fitted: site-llama)"
        and extra["fitted:zt-gpt2"] == "zerotuning (fitted: zt-gpt2)"
    )
    assert extra["fitted:broken"] == "? (fitted: broken)" and extra["fitted:alien"] == "? (fitted: alien)"
    dropdown = next(c for c in _walk(build_layout(state)) if getattr(c, "id", None) == ids.IV_METHOD)
    assert dropdown.options == options and str(root) not in str(options) and str(outside) not in str(options)
    params, info = ivcb.method_info("fitted:site-llama", "tiny", state)
    assert params == "" and info.startswith(
        "soft-injection fitted by 'attnlab intervene' (run site-llama) on toy-caps (n=12) for llama-gqa"
    )
    assert (
        info.endswith("available on this model")
        and "\n" not in info
        and 'cue="\\nA:"' in info
        and str(root) not in info
    )


def test_comparing_with_a_fitted_intervention_equals_comparing_with_the_object(fitted, llama):
    state, si, root, _ = fitted
    loaded_iv = ivapp.load_fitted(state.catalog, "site-llama", llama.name)
    assert type(loaded_iv) is type(si) and loaded_iv is not si
    np.testing.assert_array_equal(loaded_iv.theta_, si.theta_)
    via_app = ivapp.run_comparison(
        state.live,
        llama.name,
        "fitted:site-llama",
        "",
        SI_PROMPT,
        "DOG",
        (1, 0),
        catalog=state.catalog,
        max_new_tokens=3,
    )
    direct = ivapp.compare(llama, si, SI_PROMPT, "DOG", (1, 0), max_new_tokens=3)
    # the fitted injection changes the (random, near-uniform) model: the answer probability and the last query row of a
    # later layer's pattern move, so the equality below is informative
    assert abs(direct.delta_p) > 1e-6 and np.abs(direct.pattern_difference[-1]).max() > 1e-5, (
        direct.delta_p,
        np.abs(direct.pattern_difference).max(),
    )
    assert via_app.method == "soft-injection (fitted: site-llama)" and direct.method == "soft-injection"
    for f in (
        "p_baseline",
        "p_intervened",
        "output_baseline",
        "output_intervened",
        "top_intervened",
        "answer_token",
        "tokens",
        "params",
    ):
        assert getattr(via_app, f) == getattr(direct, f), f
    np.testing.assert_array_equal(via_app.pattern_intervened, direct.pattern_intervened)
    fig, outputs, msg = ivcb.comparison(
        1, "tiny", {"layer": 1, "head": 0}, "fitted:site-llama", "", SI_PROMPT, "DOG", state
    )
    assert msg == "", msg
    assert (
        "soft-injection (fitted: site-llama)" in str(outputs) and str(root) not in str(outputs) + fig.layout.title.text
    )
    assert fig.layout.meta["method"] == "soft-injection (fitted: site-llama)"


@pytest.mark.parametrize(
    "method,params,expect",
    [
        ("fitted:zt-gpt2", "", "fitted intervention 'zt-gpt2' was fitted on gpt2, not on this run's model llama-gqa"),
        ("fitted:broken", "", "fitted intervention 'broken' cannot be read: intervention.json is not valid JSON"),
        ("fitted:alien", "", "fitted intervention 'alien' does not hold an intervention of the registry"),
        ("fitted:bad-arrays", "", "fitted intervention 'bad-arrays' cannot be read: "),
        ("fitted:escape", "", "no fitted intervention named 'escape'"),
        ("fitted:../escape", "", "no fitted intervention named"),
        ("fitted:tiny", "", "no fitted intervention named 'tiny'"),
        ("fitted:site-llama", "alpha_scale=0", "runs with the parameters it was fitted with"),
    ],
)
def test_fitted_interventions_that_cannot_run_say_why_in_one_line(fitted, checkpoint_dir, method, params, expect):
    state, _, root, outside = fitted
    _, info = ivcb.method_info(method, "tiny", state)
    fig, outputs, msg = ivcb.comparison(1, "tiny", None, method, params, SI_PROMPT, "", state)
    for text in (msg, info) if not params else (msg,):
        assert expect in text and "\n" not in text and "Traceback" not in text and "internal error" not in text, text
        assert str(root) not in text and str(outside) not in text and str(checkpoint_dir) not in text, text
    assert outputs is None and len(fig.data) == 0
